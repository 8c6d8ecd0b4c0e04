"""What the reward needs of one sample (:class:`SampleOutcome`), built from a :class:`Trajectory`.

The reward never looks at tokens or images: only the response text, the answer verdict, the ops
each tool call applied (with crop boxes in image 0's frame), call counts, and, for the
reference-compatible reward, each call's text (the reference reads ops from the code, not from the
sandbox). Building the outcome is where crop boxes are mapped back to image 0: a crop made by a
call on image ``k`` has its box in image ``k``'s pixels, and ``Trajectory.image_to_origin[k]``
maps those to image 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.geometry import map_box
from cv_ray.reward.reference_tools import CallText, ReferenceToolUse
from cv_ray.types import Box, ToolCallRecord, Trajectory


@dataclass(frozen=True)
class UsedOp:
    """One op a tool call applied, as the sandbox reported it."""

    name: str
    """The sandbox's op name (``rotate_90``, ``crop``, ``contrast_up``, ``resize``, ...)."""
    changed: bool
    """Whether the op changed the image (``enhance(1.0)`` did not). Missing in a report = False:
    a bonus needs evidence."""
    call_ok: bool
    """Whether the tool call that made it succeeded (a failed call applied nothing the model saw)."""
    box: Box | None = None
    """A crop's box in image 0's frame; None for other ops and when the crop's source image is not
    a geometric view of image 0."""
    raw_box: Box | None = None
    """A crop's box as reported, in the frame of the image the call ran on."""
    frame_box: Box | None = None
    """A crop's box exactly as the code passed it, in the frame of the image it cropped inside the
    call (after a rotation in the same call, the rotated image's); None when the sandbox did not
    report it. Only the reference-compatible reward of an outcome without call text reads it."""
    verified: bool = True
    """False when the sandbox could not check the op against the pixels (``"unverified"`` in its
    report: the child's trace fits the result's size, but the pixels cannot confirm it). Such an op
    came only from the untrusted child, so the fixed reward does not pay for it."""


@dataclass
class SampleOutcome:
    """One sample of a GRPO group, reduced to what the dense reward reads."""

    response_text: str
    """The assistant text with tool responses removed (format check and answer extraction)."""
    correct: bool | None = None
    """The answer verdict, already decided by the rules or the judge; None: decide by the rules."""
    judge_failed: bool = False
    """The judge was asked and failed; ``correct`` is then a flagged False."""
    ops: list[UsedOp] = field(default_factory=list)
    """Every op of every tool call, in order (failed calls' ops carry ``call_ok=False``)."""
    num_code_calls: int = 0
    """Tool calls attempted, including ones that failed to parse or run."""
    num_tool_errors: int = 0
    """Tool calls that failed (unparseable, or the sandbox reported an error)."""
    calls: list[CallText] = field(default_factory=list)
    """Every tool call as text, in order (the reference-compatible reward reads ops from these)."""
    tool_use: ReferenceToolUse | None = None
    """The reference's reading of the calls once the LLM judge was consulted (reference-compatible
    mode with a judge); None: read from ``calls`` by the code heuristics alone."""


def _call_text(call: ToolCallRecord) -> CallText:
    error_shown = not call.ok or (call.result is not None and "Error" in call.result.stdout)
    return CallText(turn=call.turn, payload=call.payload, parsed=call.parsed, error_class=call.parse_error_class,
                    code=call.code, description=call.description, error_shown=error_shown)


def _box(value: object) -> Box | None:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else None  # type: ignore[union-attr]


def outcome_from_trajectory(traj: Trajectory) -> SampleOutcome:
    """Reduce a trajectory to its :class:`SampleOutcome` (``correct`` left undecided).

    Crops carry their box three ways: mapped to image 0 (``box``), as reported in the call's input
    frame (``raw_box``) and as the code wrote it (``frame_box``, when the sandbox reports it).
    """
    ops: list[UsedOp] = []
    for call in traj.tool_calls:
        if call.result is None:
            continue
        to_origin = traj.image_to_origin[call.image_index] if 0 <= call.image_index < len(traj.image_to_origin) else None
        for op in call.result.ops:
            is_crop = op.get("op") == "crop"
            raw_box = _box(op.get("box")) if is_crop else None
            ops.append(UsedOp(
                name=str(op.get("op", "")),
                changed=bool(op.get("changed", False)),
                call_ok=call.ok,
                box=map_box(to_origin, raw_box) if raw_box is not None and to_origin is not None else None,
                raw_box=raw_box,
                frame_box=_box(op.get("frame_box")) if is_crop else None,
                verified=not op.get("unverified", False),
            ))
    return SampleOutcome(
        response_text=traj.response_text,
        ops=ops,
        num_code_calls=len(traj.tool_calls),
        num_tool_errors=sum(not call.ok for call in traj.tool_calls),
        calls=[_call_text(call) for call in traj.tool_calls],
    )
