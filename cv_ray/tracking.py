"""Metrics and sample logging for a run: console, JSONL in the run directory, and wandb.

    tracker = Tracker(cfg.logger, run_dir, run_name="tiny_cpu", config=as_dict(cfg))
    tracker.log({"reward/mean": 0.8, "time/rollout_s": 3.2}, step=5, stage="rl")
    tracker.log_samples(samples, step=5)        # wandb Table + the static HTML viewer
    tracker.close()
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from cv_ray.config import LoggerConfig
from cv_ray.viewer import RolloutViewer, ViewerSample, contact_sheet

log = logging.getLogger("cv_ray")

# Keys shown on the one-line console summary of a step, in this order, when present.
_CONSOLE_KEYS = (
    "sft/loss", "sft/grad_norm", "reward/total", "reward/correct", "eval/accuracy", "rollout/tool_calls_mean",
    "rollout/tool_errors", "learner/rl/loss", "learner/rl/kl", "learner/rl/grad_norm", "time/step_s",
)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only (bools as 0/1); non-finite values are kept as strings so nothing is lost silently."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value) if math.isfinite(value) else str(value)
    return out


class Tracker:
    """One run's loggers. Every backend gets the same numbers; the JSONL file is the source of truth."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._jsonl = self.metrics_path.open("a") if "jsonl" in cfg.backends else None
        self.viewer = RolloutViewer(self.run_dir / "viewer")
        self._wandb = None
        if "wandb" in cfg.backends and cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project, name=run_name, dir=str(self.run_dir), mode=cfg.wandb_mode,
                config=config or {}, reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int, stage: str) -> None:
        clean = _finite(metrics)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        if "console" in self.cfg.backends:
            shown = [f"{k}={clean[k]:.4g}" for k in _CONSOLE_KEYS if isinstance(clean.get(k), float)]
            log.info("[%s %d] %s", stage, step, "  ".join(shown) or f"{len(clean)} metrics")
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in clean.items() if isinstance(v, float)}, step=step)

    def log_samples(self, samples: list[ViewerSample], step: int, stage: str = "rl") -> Path:
        """Write samples to the HTML viewer (and a wandb Table with every turn's image)."""
        page = self.viewer.add(samples, step=step, stage=stage)
        if self._wandb is not None and samples:
            import wandb

            table = wandb.Table(columns=["step", "uid", "reward", "question", "response", "images"])
            for s in samples:
                sheet = wandb.Image(contact_sheet(s.images)) if s.images else None
                table.add_data(step, s.uid, s.reward, s.question, s.response_text, sheet)
            self._wandb.log({f"{stage}/samples": table}, step=step)
        return page

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
