"""The single controller: runs data | sft | rl | eval | pipeline from one typed config.

It is the only place that knows the order of things; actor groups are thin shells that it builds
from their own sub-configs. Run it through the `cv-ray` command (see cv_ray/cli.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cv_ray.config import Config, as_dict, to_yaml
from cv_ray.models import prepare_model

log = logging.getLogger("cv_ray.driver")

PIPELINE = ("data", "sft", "rl", "eval")


def _stage_fns():
    return {}


def run(cfg: Config) -> float | None:
    """Run the configured stage (or the whole pipeline) and return the final held-out accuracy if any."""
    work_dir = Path(cfg.trainer.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.resolved.yaml").write_text(to_yaml(cfg))
    log.info("run directory: %s", work_dir.resolve())
    log.info("resolved config:\n%s", to_yaml(cfg))

    start = time.perf_counter()
    model_dir, family = prepare_model(cfg.model.path, cfg.model.family, cfg.model.build_tiny)
    log.info("model: %s (%s), ready in %.1f s", model_dir, family, time.perf_counter() - start)

    stages = PIPELINE if cfg.trainer.stage == "pipeline" else (cfg.trainer.stage,)
    fns = _stage_fns()
    summary: dict = {"model": str(model_dir), "family": family, "stages": {}}
    for stage in stages:
        if stage not in fns:
            log.warning("stage %r is not available in this build yet; skipped", stage)
            continue
        t0 = time.perf_counter()
        summary["stages"][stage] = fns[stage](cfg, work_dir)
        log.info("stage %s done in %.1f s", stage, time.perf_counter() - t0)
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("config groups: %s", ", ".join(as_dict(cfg)))
    return None
