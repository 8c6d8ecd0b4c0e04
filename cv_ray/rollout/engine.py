"""Pick a generation engine by name (``rollout.engine``): HF (transformers, CPU or GPU) or vLLM (GPU).

The interface every engine implements (``Engine``, ``GenerationRequest``, ``SamplingParams``,
``GenerationOutput``) is the agent layer's: :mod:`cv_ray.agent.generation`.
"""

from __future__ import annotations

import importlib

from cv_ray.agent.generation import Engine
from cv_ray.models import ModelRef
from cv_ray.rollout.config import RolloutConfig

# Engines by config name, imported on demand (vLLM exists only on GPU nodes).
_ENGINES = {"hf": ("cv_ray.rollout.hf_engine", "HFEngine"), "vllm": ("cv_ray.rollout.vllm_engine", "VLLMEngine")}


def make_engine(model: ModelRef, cfg: RolloutConfig) -> Engine:
    """Build the engine ``cfg.engine`` names for ``model`` (its directory and image bounds)."""
    if cfg.engine not in _ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; use one of {sorted(_ENGINES)}")
    module_name, class_name = _ENGINES[cfg.engine]
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls.from_config(model, cfg)
