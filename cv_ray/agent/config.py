"""What the agent loop reads of the configuration: :class:`LoopSettings` (light: no model code).

The rollout group's config (``cv_ray.rollout.config.RolloutConfig``, Hydra group ``rollout``) extends
it, so these keys are ``rollout.max_turns``, ``rollout.temperature``, ... and a ``RolloutConfig`` is
the settings its workers' agent loops run with; tests and tools build a bare ``LoopSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoopSettings:
    max_turns: int = 12
    """Assistant turns per episode (the reference recipe uses 12)."""
    max_new_tokens_per_turn: int = 1024
    """Sampled tokens per assistant turn."""
    max_response_tokens: int = 16384
    """Token budget of a whole episode's response (sampled + tool tokens)."""
    temperature: float = 1.0
    """Sampling temperature (a call may override it, e.g. 0 for greedy validation); the learner scores
    tokens at the same one (importance ratio 1 on-policy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off)."""
    max_concurrent_trajectories: int = 64
    """Episodes in flight at once per rollout worker (one agent loop)."""
    tool_image_min_pixels: int = 28 * 28 * 4
    """Lower pixel bound of tool images as the model sees them."""
    tool_image_max_pixels: int = 1024 * 28 * 28
    """Tool images are resized into this range for the model; originals are kept for image_index."""
