"""Metrics and trajectories of a run: console, `metrics.jsonl`, the static dashboard, and wandb.

    tracker = Tracker(cfg.logger, run_dir, run_name="tiny_cpu", config=as_dict(cfg))
    tracker.rewind("rl", start_step)             # a resumed run: forget the steps it is about to redo
    tracker.log({"reward/total": 0.8, "time/rollout_s": 3.2}, step=5, stage="rl")
    tracker.log_samples([RolloutSample.from_rollout(task, traj, breakdown), ...], step=5, stage="rl")
    tracker.log_eval_report(run_dir / "eval")
    tracker.close()

`metrics.jsonl` is the source of truth: a tracker opened on a run directory that has one reads it
back, so the dashboard of a run made of several commands (`stage=sft`, then `stage=rl`) shows them
all. Every row gains the tool-use rates (cv_ray/tracking/collapse.py) and, per watched rate, an
`alarm/<rate>` flag; the tool-use collapse alarm warns on the console, in the dashboard and as a
wandb alert when it starts. In wandb each stage's metrics are plotted against that stage's own step
(`<stage>/step`), so SFT steps and RL steps do not collide on one axis. wandb cannot forget rows: a
resumed run is a new wandb run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from cv_ray.config import LoggerConfig
from cv_ray.dashboard import Dashboard, RolloutSample
from cv_ray.dashboard.writer import SCREEN_SIDE
from cv_ray.tracking.collapse import WATCHED, collapse, tool_use_rates

log = logging.getLogger("cv_ray")

# Keys shown on the one-line console summary of a step, in this order, when present.
_CONSOLE_KEYS = (
    "sft/loss", "sft/grad_norm", "reward/total", "reward/correct", "eval/accuracy", "rollout/tool_calls_mean",
    "tool_use/valid_call_rate", "rollout/tool_errors", "learner/rl/loss", "learner/rl/kl", "learner/rl/grad_norm",
    "time/step_s",
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


def alarm_key(metric: str) -> str:
    return f"alarm/{metric}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``. Unreadable lines (a killed run's half-written last row) are
    moved to ``<path>.broken`` with a warning, so the file can be appended to again."""
    if not path.exists():
        return []
    rows, broken = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # our own file, but a process killed mid-write leaves half a line
            broken.append(line)
    if broken:
        with path.with_name(path.name + ".broken").open("a") as f:
            f.write("\n".join(broken) + "\n")
        _write_rows(path, rows)
        log.warning("%s: %d unreadable line(s) (a run killed while writing?) moved to %s.broken",
                    path, len(broken), path.name)
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def _reward_weights(config: dict | None) -> dict[str, float]:
    """The signed weight of each reward term in this run's config (shown beside each term)."""
    if not config or "reward" not in config:
        return {}
    from omegaconf import OmegaConf

    from cv_ray.reward.config import RewardConfig
    from cv_ray.reward.dense import term_weights

    return term_weights(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), config["reward"])))


class Tracker:
    """One run's loggers. Every backend gets the same numbers; the JSONL file is the source of truth."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows = read_metrics(self.metrics_path)
        self._jsonl = self.metrics_path.open("a") if "jsonl" in cfg.backends else None
        self.dashboard = (Dashboard(self.run_dir / "dashboard", run_name, self.rows, _reward_weights(config))
                          if cfg.dashboard else None)
        if self.dashboard is not None:
            self.dashboard.set_alarms(self.alarm_events())
            log.info("dashboard (open it in a browser while the run goes): file://%s",
                     self.dashboard.index_path.resolve())
        self._wandb = None
        self._wandb_stages: set[str] = set()
        if "wandb" in cfg.backends and cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project, name=run_name, dir=str(self.run_dir), mode=cfg.wandb_mode,
                config=config or {}, reinit="finish_previous",
            )

    # ----------------------------------------------------------------------------------- metrics

    def log(self, metrics: dict[str, Any], step: int, stage: str) -> None:
        clean = _finite(metrics)
        clean.update(tool_use_rates(clean))
        onsets = []
        for metric in WATCHED:
            if not isinstance(clean.get(metric), float):
                continue
            history = [r for r in self.rows if r["stage"] == stage and isinstance(r.get(metric), float)]
            alarm = self._collapse(metric, [r["step"] for r in history] + [step],
                                   [r[metric] for r in history] + [clean[metric]])
            clean[alarm_key(metric)] = 1.0 if alarm else 0.0
            if alarm and not (history and history[-1].get(alarm_key(metric))):
                onsets.append(alarm)
        row = {"stage": stage, "step": step, "time": time.time(), **clean}
        self.rows.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self.dashboard is not None:
            self.dashboard.add_row(row)
            if any(k.startswith("alarm/") for k in clean):
                self.dashboard.set_alarms(self.alarm_events())
        if "console" in self.cfg.backends:
            shown = [f"{k}={clean[k]:.4g}" for k in _CONSOLE_KEYS if isinstance(clean.get(k), float)]
            log.info("[%s %d] %s", stage, step, "  ".join(shown) or f"{len(clean)} metrics")
        for alarm in onsets:
            log.warning("[%s %d] %s. The policy may be giving up the tool: read this step's trajectories in the "
                        "dashboard; logger.collapse_* set the alarm.", stage, step, alarm.message())
        if self._wandb is not None:
            self._wandb_log(stage, step, {k: v for k, v in clean.items() if isinstance(v, float)})
            for alarm in onsets:
                self._wandb.alert(title="tool-use collapse", text=f"[{stage} {step}] {alarm.message()}", level="WARN")

    def _collapse(self, metric: str, steps: list[int], values: list[float]):
        return collapse(metric, steps, values, self.cfg.collapse_window, self.cfg.collapse_drop,
                        self.cfg.collapse_min_rate)

    def alarm_events(self) -> list[dict[str, Any]]:
        """Every tool-use collapse alarm of the run so far: where it started, whether it still holds."""
        events: list[dict[str, Any]] = []
        for stage in dict.fromkeys(r["stage"] for r in self.rows):
            for metric in WATCHED:
                history = [r for r in self.rows if r["stage"] == stage and isinstance(r.get(metric), float)]
                steps, values = [r["step"] for r in history], [r[metric] for r in history]
                current = None
                for i in range(len(history)):
                    lo = max(0, i - self.cfg.collapse_window)  # the alarm reads only the last window + 1 values
                    alarm = self._collapse(metric, steps[lo:i + 1], values[lo:i + 1])
                    if alarm and current is None:
                        current = {"stage": stage, "metric": metric, "step": alarm.to_step,
                                   "from_step": alarm.from_step, "from_value": alarm.from_value,
                                   "to_value": alarm.to_value, "drop": alarm.drop, "message": alarm.message(),
                                   "active": True, "until": None}
                        events.append(current)
                    elif not alarm and current is not None:
                        current.update(active=False, until=history[i]["step"])
                        current = None
        return sorted(events, key=lambda e: (e["stage"], e["step"]))

    def _wandb_log(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if stage not in self._wandb_stages:  # each stage on its own x axis: SFT and RL steps both start at 0
            self._wandb.define_metric(f"{stage}/step")
            self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._wandb_stages.add(stage)
        self._wandb.log({**{f"{stage}/{k}": v for k, v in values.items()}, f"{stage}/step": step})

    # ------------------------------------------------------------------------------ trajectories

    def log_samples(self, samples: list[RolloutSample], step: int, stage: str = "rl") -> Path | None:
        """A step's trajectories: to the dashboard (returns its data file) and a wandb Table, one row per
        turn with its code, the image the call read, the image it returned, and the reward terms."""
        if not samples:  # logger.samples_per_step=0
            return None
        page = self.dashboard.add_samples(samples, step=step, stage=stage) if self.dashboard is not None else None
        if self._wandb is not None:
            self._wandb_log(stage, step, {"samples": self._wandb_table(samples, step, stage)})
        return page

    @staticmethod
    def _wandb_table(samples: list[RolloutSample], step: int, stage: str):
        import wandb

        def image(sample: RolloutSample, index: int | None):
            if index is None or not 0 <= index < len(sample.images):
                return None
            copy = sample.images[index].convert("RGB")
            copy.thumbnail((SCREEN_SIDE, SCREEN_SIDE))
            return wandb.Image(copy)

        term_names = sorted({name for s in samples for name in s.terms})
        table = wandb.Table(columns=["stage", "step", "uid", "sample", "reward", "correct", "stop_reason", "turn",
                                     "text", "code", "input_image", "output_image", "error_class", "ops",
                                     *[f"term/{name}" for name in term_names]])
        for s in samples:
            terms = [s.terms.get(name) for name in term_names]
            for turn in s.turns:
                text = "".join(segment["text"] for segment in turn["segments"])
                for call in turn["calls"] or [None]:
                    table.add_data(
                        stage, step, s.uid, s.sample_index, s.reward, s.correct, s.stop_reason, turn["index"], text,
                        call["code"] if call else "", image(s, call["image_index"]) if call else None,
                        image(s, call["output_index"]) if call else None, call["error_class"] if call else "",
                        ", ".join(op["op"] for op in call["ops"]) if call else "", *terms)
        return table

    # ------------------------------------------------------------------------------ eval, resume

    def log_eval_report(self, eval_dir: Path) -> None:
        """Link an evaluation report (``report.md``, ``metrics.json``, plots) from the dashboard."""
        if self.dashboard is not None:
            self.dashboard.set_eval_report(eval_dir)

    def rewind(self, stage: str, step: int) -> int:
        """Forget ``stage``'s rows and trajectories from ``step`` on; returns how many rows went.

        A run killed after its last checkpoint logged steps that the resumed run does again: call this
        with the step it resumes from, so each step is shown once (in the JSONL file and the dashboard).
        """
        kept = [r for r in self.rows if not (r["stage"] == stage and r["step"] >= step)]
        dropped = len(self.rows) - len(kept)
        if dropped:
            self.rows = kept
            if self._jsonl is not None:
                self._jsonl.close()
            _write_rows(self.metrics_path, kept)
            self._jsonl = self.metrics_path.open("a") if "jsonl" in self.cfg.backends else None
            log.info("metrics: dropped %d row(s) of stage %s from step %d on (redone by this run)", dropped, stage, step)
        if self.dashboard is not None:
            self.dashboard.rewind(stage, step, self.rows)
            self.dashboard.set_alarms(self.alarm_events())
        return dropped

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.dashboard is not None:
            self.dashboard.finish()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
