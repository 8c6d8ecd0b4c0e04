"""Model directories: family detection and the tiny models built for tests and the quickstart."""

from __future__ import annotations

import json
from pathlib import Path

from cv_ray.errors import ConfigError

_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def detect_family(model_dir: str | Path) -> str:
    """`qwen2_5_vl` or `qwen3_vl`, read from the checkpoint's config.json."""
    config = Path(model_dir) / "config.json"
    if not config.exists():
        raise ConfigError("model.path", f"{model_dir} has no config.json",
                          "point model.path at a Hugging Face model directory, or set model.build_tiny")
    model_type = json.loads(config.read_text()).get("model_type", "")
    if model_type not in _MODEL_TYPES:
        raise ConfigError("model.path", f"model_type {model_type!r} in {config} is not supported",
                          "use a Qwen2.5-VL or Qwen3-VL checkpoint")
    return _MODEL_TYPES[model_type]


def prepare_model(path: str, family: str, build_tiny: str) -> tuple[Path, str]:
    """Return (model directory, family), building the tiny model first when asked and missing."""
    from cv_ray.models.tiny import ensure_tiny_model

    model_dir = Path(path)
    if build_tiny:
        ensure_tiny_model(build_tiny, model_dir)
    elif not model_dir.exists():
        raise ConfigError("model.path", f"{model_dir} does not exist",
                          "give a local checkpoint directory (no hub downloads at run time), "
                          "or set model.build_tiny=qwen2_5_vl for the tiny test model")
    detected = detect_family(model_dir)
    if family not in ("auto", detected):
        raise ConfigError("model.family", f"{family!r} but {model_dir} is a {detected} checkpoint",
                          f"set model.family={detected} or model.family=auto")
    return model_dir, detected
