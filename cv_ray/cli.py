"""`cv-ray`: the command-line entry point (Hydra).

    cv-ray                                  # CPU quickstart: tiny model, data, SFT, RL, eval on a local Ray
    cv-ray stage=rl model=/ckpt/Qwen2.5-VL-7B rollout=vllm learner=zero3_gpu
    cv-ray stage=eval model=/ckpt/my-rl-model eval.suites=[orientation,corruption]
    cv-ray --cfg job                        # print the resolved config and exit
    cv-ray -m reward.alpha=0.5,1.0          # a sweep: one run directory per job, and a summary table

The config tree is `conf/` (YAML groups) over the typed schema in `cv_ray/config.py`. A bad value
stops the run before any actor starts, with a message that names the key and the fix. Two
shorthands are expanded before Hydra sees the arguments (:func:`expand_shorthands`): `stage=X` and
`model=PATH`.
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

MODEL_PRESETS = frozenset(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))

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


def expand_shorthands(args: list[str]) -> list[str]:
    """Rewrite the two shorthands into plain Hydra overrides; every other argument passes unchanged.

    - `stage=X` -> `trainer.stage=X`.
    - `model=PATH` (a directory, not one of the `conf/model/` presets) -> `model=checkpoint
      model.path=PATH`, the family read from the checkpoint; with stage `eval` also `eval.model=PATH`,
      so exactly that model is evaluated rather than the newest one trained in the run directory.
    """
    out: list[str] = []
    model_path = ""
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "stage":
            out.append(f"trainer.stage={value}")
        elif (sep and key == "model" and value not in MODEL_PRESETS and "," not in value
              and ("/" in value or Path(value).is_dir())):
            model_path = str(Path(value).expanduser().resolve())
            out += ["model=checkpoint", f"model.path={model_path}"]
        else:
            out.append(arg)
    if model_path and "trainer.stage=eval" in out and not any(a.startswith("eval.model=") for a in out):
        out.append(f"eval.model={model_path}")
    return out


def main() -> None:
    sys.argv[1:] = expand_shorthands(sys.argv[1:])
    _hydra_entry()


if __name__ == "__main__":
    main()
