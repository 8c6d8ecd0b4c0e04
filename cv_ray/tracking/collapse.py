"""The tool-use collapse alarm, as pure functions: tool-use rates of a step, and whether one fell.

A known failure of tool-use RL is the policy giving the tool up: calls get rarer (or fail more)
step after step until it answers blind. :func:`tool_use_rates` derives the two rates watched from a
step's rollout metrics; :func:`collapse` compares a rate's latest value with its value ``window``
logged steps earlier. The tracker (cv_ray/tracking/tracker.py) runs it at every step and warns on the
console, in the dashboard and in wandb when an alarm starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The rates watched, by metric name.
CALL_RATE = "tool_use/call_rate"
"""Tool calls per trajectory (``rollout/tool_calls_mean``)."""
VALID_RATE = "tool_use/valid_call_rate"
"""Tool calls that parsed and ran, over all tool calls (absent in a step without calls)."""
WATCHED = (CALL_RATE, VALID_RATE)


def tool_use_rates(metrics: Mapping[str, float]) -> dict[str, float]:
    """The watched rates of one step, from its ``rollout/*`` metrics (empty when it has none)."""
    rates = {}
    if "rollout/tool_calls_mean" in metrics:
        rates[CALL_RATE] = float(metrics["rollout/tool_calls_mean"])
    calls = float(metrics.get("rollout/tool_calls", 0.0))
    if calls > 0 and "rollout/tool_errors" in metrics:
        rates[VALID_RATE] = (calls - float(metrics["rollout/tool_errors"])) / calls
    return rates


@dataclass(frozen=True)
class Collapse:
    """A rate that fell by more than the allowed fraction between two logged steps."""

    metric: str
    from_step: int
    to_step: int
    from_value: float
    to_value: float

    @property
    def drop(self) -> float:
        """The fall as a fraction of the earlier value."""
        return (self.from_value - self.to_value) / self.from_value

    def message(self) -> str:
        return (f"tool-use collapse: {self.metric} fell {self.drop:.0%} in {self.to_step - self.from_step} steps "
                f"({self.from_value:.3g} at step {self.from_step} -> {self.to_value:.3g} at step {self.to_step})")


def collapse(metric: str, steps: Sequence[int], values: Sequence[float], window: int, max_drop: float,
             min_rate: float) -> Collapse | None:
    """Whether ``metric`` fell by more than ``max_drop`` (a fraction) over the last ``window`` logged steps.

    ``steps``/``values``: the rate at each logged step, oldest first. The latest value is compared with
    the one ``window`` entries before it; an earlier value below ``min_rate`` never raises the alarm (a
    rate that was never really used cannot collapse). ``window`` 0 turns the alarm off; fewer than
    ``window + 1`` values are not enough to judge.
    """
    if window <= 0 or len(values) <= window:
        return None
    before, now = float(values[-window - 1]), float(values[-1])
    if before < min_rate or before <= 0 or (before - now) / before <= max_drop:
        return None
    return Collapse(metric, int(steps[-window - 1]), int(steps[-1]), before, now)
