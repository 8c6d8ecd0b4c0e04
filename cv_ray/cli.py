"""`cv-ray`: the command-line entry point (Hydra).

    cv-ray                                  # CPU quickstart: tiny model, data, SFT, RL, eval on a local Ray
    cv-ray trainer.stage=rl model.path=/ckpt/Qwen2.5-VL-7B rollout=vllm learner=zero3_gpu
    cv-ray --cfg job                        # print the resolved config and exit
    cv-ray -m reward.alpha=0.5,1.0          # a sweep: one run directory per job, and a summary table

The config tree is `conf/` (YAML groups) over the typed schema in `cv_ray/config.py`. A bad value
stops the run before any actor starts, with a message that names the key and the fix.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cv_ray.config import register_configs, to_typed, validate
from cv_ray.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("cv_ray")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_entry(raw: DictConfig) -> float | None:
    from cv_ray.driver import run

    try:
        cfg = to_typed(raw)
        validate(cfg)
    except ConfigError as err:
        # A clean, one-line message instead of a traceback: the user's fix is in it.
        print(f"cv-ray: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        return run(cfg)
    except ConfigError as err:  # raised once the cluster's resources are known
        print(f"cv-ray: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_entry()


if __name__ == "__main__":
    main()
