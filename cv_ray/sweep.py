"""Reward-weight sweeps: a Hydra callback that writes one summary table across the jobs of a multirun.

    cv-ray -m reward.alpha=0.5,1.0 reward.gamma=0.25,0.5

Hydra runs the jobs one after another in this process, so they share one Ray cluster; each job has
its own run directory (and wandb run). At the end this callback reads every job's `summary.json` and
writes `summary.md` and `summary.json` in the sweep directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("cv_ray.sweep")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory that has a summary: its overrides and its final metrics."""
    rows = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        overrides_path = summary_path.parent / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_path.exists():
            overrides = [line[2:].strip() for line in overrides_path.read_text().splitlines() if line.startswith("- ")]
        rows.append({"job": summary_path.parent.name, "overrides": overrides, **summary.get("final", {})})
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No finished jobs.\n"
    metric_keys = sorted({k for r in rows for k in r if k not in ("job", "overrides")})
    head = "| job | overrides | " + " | ".join(metric_keys) + " |"
    sep = "|" + "---|" * (2 + len(metric_keys))
    lines = [head, sep]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else str(r.get(k, "")) for k in metric_keys]
        lines.append(f"| {r['job']} | {' '.join(r['overrides'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        (sweep_dir / "summary.md").write_text(to_markdown(rows))
        log.info("sweep summary (%d jobs): %s", len(rows), sweep_dir / "summary.md")
