"""Model directories: how every component loads a model's processor, family detection, and the tiny
models built for tests and the quickstart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cv_ray.errors import ConfigError

_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


@dataclass(frozen=True)
class ModelRef:
    """A model directory and the image bounds every component must process its images with.

    The rollout engines (HF and vLLM), the SFT stage and the learner all build their image processor
    from one ``ModelRef`` (``model.min_pixels`` / ``model.max_pixels`` in the config), so an image
    becomes the same pixel tensor and the same number of image tokens everywhere: a mismatch between
    the sampler's and the trainer's resizing shows up as a KL spike, or as an image-token count that
    no longer matches the image features. ``None`` bounds keep the checkpoint's own.
    """

    path: str
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def of(cls, model: ModelRef | str | Path) -> ModelRef:
        """``model`` itself, or a bare directory with the checkpoint's own image bounds."""
        return model if isinstance(model, ModelRef) else cls(str(model))

    def with_path(self, path: str | Path) -> ModelRef:
        """Another model directory (e.g. the SFT model) processed with the same image bounds."""
        return ModelRef(str(path), self.min_pixels, self.max_pixels)

    def processor_kwargs(self) -> dict[str, int]:
        """The bounds as the Qwen-VL processors take them (``AutoProcessor`` and vLLM's ``mm_processor_kwargs``)."""
        kwargs = {}
        if self.min_pixels is not None:
            kwargs["min_pixels"] = int(self.min_pixels)
        if self.max_pixels is not None:
            kwargs["max_pixels"] = int(self.max_pixels)
        return kwargs

    def load_processor(self) -> Any:
        """The model's processor with these image bounds."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.path, **self.processor_kwargs())


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


def prepare_model(path: str, family: str, build_tiny: str, tiny_spec: str = "tiny") -> tuple[Path, str]:
    """Return (model directory, family), building the tiny model (of size preset ``tiny_spec``) first
    when asked and missing."""
    from cv_ray.models.tiny import TINY_SPECS, ensure_tiny_model

    model_dir = Path(path)
    if build_tiny:
        try:
            ensure_tiny_model(build_tiny, model_dir, spec=TINY_SPECS[tiny_spec])
        except ValueError as exc:  # a tiny model of other sizes is already there
            raise ConfigError("model.path", str(exc), "remove the directory, or set model.path elsewhere") from exc
    elif not model_dir.exists():
        raise ConfigError("model.path", f"{model_dir} does not exist",
                          "give a local checkpoint directory (no hub downloads at run time), "
                          "or set model.build_tiny=qwen2_5_vl for the tiny test model")
    detected = detect_family(model_dir)
    if family not in ("auto", detected):
        raise ConfigError("model.family", f"{family!r} but {model_dir} is a {detected} checkpoint",
                          f"set model.family={detected} or model.family=auto")
    return model_dir, detected


def load_state_dict(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's parameters under the names its loaded module uses (what an engine's
    ``update_weights`` takes; the files on disk may hold the checkpoint format's legacy names, which
    ``from_pretrained`` maps)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()

