"""Batch metrics of a rollout: turns, tool calls, tool errors by class, tokens, generation vs tool time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cv_ray.types import Trajectory


def batch_metrics(trajectories: Sequence[Trajectory], wall_s: float) -> dict[str, float]:
    """Means and totals over a batch (keys prefixed ``rollout/``); pure.

    Times: ``generation_s`` / ``tool_s`` sum every trajectory's own waits; trajectories overlap, so
    either may exceed ``wall_s``.
    """
    n = len(trajectories)
    if n == 0:
        return {"rollout/trajectories": 0.0, "rollout/wall_s": wall_s}
    total = Counter()
    for t in trajectories:
        for key, value in t.metrics.items():
            total[key] += value
    stops = Counter(t.stop_reason for t in trajectories)
    metrics = {
        "rollout/trajectories": float(n),
        "rollout/wall_s": wall_s,
        "rollout/turns_mean": sum(t.num_turns for t in trajectories) / n,
        "rollout/tool_calls_mean": total["tool_calls"] / n,
        "rollout/tool_calls": float(total["tool_calls"]),
        "rollout/tool_errors": float(total["tool_errors"]),
        "rollout/response_tokens_mean": total["response_tokens"] / n,
        "rollout/sampled_tokens": float(total["sampled_tokens"]),
        "rollout/generation_s": float(total["generation_s"]),
        "rollout/tool_s": float(total["tool_s"]),
    }
    metrics.update({f"rollout/{k}": float(v) for k, v in total.items() if k.startswith("tool_errors/")})
    metrics.update({f"rollout/stop/{reason}": count / n for reason, count in stops.items()})
    return metrics
