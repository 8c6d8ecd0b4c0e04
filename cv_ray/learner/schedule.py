"""Learning-rate schedules: linear warm-up, then cosine decay to 0 or a constant rate (pure functions).

``step`` counts optimizer steps from 0. Schedules register by name in :data:`LR_SCHEDULES`.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: ``ceil(warmup_ratio * total_steps)`` (0 when either is 0)."""
    return math.ceil(warmup_ratio * total_steps) if total_steps > 0 else 0


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The warm-up multiplier ``(step + 1) / warmup_steps`` while warming up, else None."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """After warm-up: ``0.5 (1 + cos(pi p))``, progress ``p = (step - warmup) / (total - warmup)``; 0 past the end."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, warmup_steps: int, total_steps: int) -> float:
    """After warm-up: 1."""
    warm = _warmup(step, warmup_steps)
    return 1.0 if warm is None else warm


LR_SCHEDULES = {"cosine": cosine, "constant": constant}
