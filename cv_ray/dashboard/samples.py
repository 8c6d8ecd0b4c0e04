"""One trajectory as the dashboard and wandb show it: turns, tool calls, images, boxes, reward terms.

:meth:`RolloutSample.from_rollout` reduces a (task, trajectory, reward breakdown) triple to what a
researcher reads: each assistant turn's text split into prose, tool-call blocks and the answer;
each call's code, the image it read and the image it returned, its error class and the text the
model read back, and the ops the sandbox recognised (``verified`` unless the sandbox marked them
``unverified``); every crop box and every tool output's extent mapped to image 0 through the
trajectory's lineage (``Trajectory.image_to_origin``); the reward's terms; token counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cv_ray.geometry import map_box
from cv_ray.types import Box, RewardBreakdown, Task, ToolCallRecord, Trajectory

# What a turn's text is cut into: thinking, tool-call blocks and the answer, between prose.
_SEGMENT = re.compile(r"(<think>.*?</think>|<tool_call>.*?</tool_call>|<answer>.*?</answer>)", re.DOTALL)
_KIND_OF_TAG = {"<think>": "think", "<tool_call>": "call", "<answer>": "answer"}


def split_turn_text(text: str) -> list[dict[str, str]]:
    """``text`` as segments ``{"kind": "text" | "think" | "call" | "answer", "text": ...}`` whose texts
    join to ``text`` (tags included: nothing the model wrote is dropped)."""
    segments = []
    for piece in _SEGMENT.split(text):
        if piece:
            kind = next((k for tag, k in _KIND_OF_TAG.items() if piece.startswith(tag)), "text")
            segments.append({"kind": kind, "text": piece})
    return segments


def _op_view(op: dict[str, Any]) -> dict[str, Any]:
    """An op of the sandbox's report, with the verification made explicit (the report marks only doubt).

    ``changed`` is the report's own flag, None where it has none (core ops: a turn or a crop always
    changes the image, so the sandbox does not say)."""
    params = {k: v for k, v in op.items() if k not in ("op", "changed", "unverified", "via")}
    return {"op": str(op.get("op", "")), "params": params,
            "changed": bool(op["changed"]) if "changed" in op else None,
            "verified": not op.get("unverified", False), "via": str(op.get("via", ""))}


def _error_class(call: ToolCallRecord) -> str:
    """The counted class of a failed call, as the agent loop counts it (``""`` for a call that worked)."""
    if call.ok:
        return ""
    if not call.parsed:
        return call.parse_error_class or "unknown"
    return (call.result.error_class if call.result else None) or "unknown"


def _origin_box(to_origin: list[list[float]] | None, box: Box | None) -> Box | None:
    return [round(v, 2) for v in map_box(to_origin, box)] if to_origin is not None and box is not None else None


@dataclass
class RolloutSample:
    """A trajectory with its task and reward, ready to be written out (images kept as PIL images)."""

    uid: str
    """The task uid (the GRPO group key)."""
    sample_index: int
    question: str
    answer: str
    reward: float
    correct: bool = False
    terms: dict[str, float] = field(default_factory=dict)
    """The reward's unweighted terms (``RewardBreakdown.terms``)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Log-only numbers beside the reward (``RewardBreakdown.stats``)."""
    judge_failed: bool = False
    stop_reason: str = ""
    task_type: str = ""
    data_source: str = ""
    required_ops: list[str] = field(default_factory=list)
    answer_box: Box | None = None
    """Where the answer is, in image 0's pixels (the task's)."""
    turns: list[dict[str, Any]] = field(default_factory=list)
    """Per assistant turn: ``{"index", "segments": split_turn_text(...), "calls": [call, ...]}``."""
    images: list[Image.Image] = field(default_factory=list)
    """Image 0 first, then each tool output, at full resolution."""
    image_parent: list[int | None] = field(default_factory=list)
    image_on_origin: list[Box | None] = field(default_factory=list)
    """Per image: its whole frame mapped to image 0 (None when it is not a geometric view of image 0)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """``prompt``, ``response``, ``sampled`` (policy tokens) and ``inserted`` (tool responses and turn separators)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The trajectory's own timings and counts (``Trajectory.metrics``)."""

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [call for turn in self.turns for call in turn["calls"]]

    @property
    def error_classes(self) -> list[str]:
        return sorted({call["error_class"] for call in self.tool_calls if call["error_class"]})

    @classmethod
    def from_rollout(cls, task: Task, traj: Trajectory, breakdown: RewardBreakdown) -> RolloutSample:
        texts = traj.turn_texts or [traj.response_text]
        turns = [{"index": i, "segments": split_turn_text(text), "calls": []} for i, text in enumerate(texts)]
        for call in traj.tool_calls:
            result = call.result
            to_origin = (traj.image_to_origin[call.image_index]
                         if 0 <= call.image_index < len(traj.image_to_origin) else None)
            ops = [_op_view(op) for op in (result.ops if result else [])]
            for op in ops:
                if op["op"] == "crop" and op["params"].get("box") is not None:
                    op["box_on_origin"] = _origin_box(to_origin, [float(v) for v in op["params"]["box"]])
            view = {
                "turn": call.turn,
                "code": call.code,
                "parsed": call.parsed,
                "ok": call.ok,
                "image_index": call.image_index,
                "output_index": call.output_index,
                "error_class": _error_class(call),
                "error": (result.error or "") if result else "",
                "stdout": result.stdout if result else "",
                "seconds": round(result.seconds, 4) if result else 0.0,
                "ops": ops,
            }
            while len(turns) <= call.turn:  # a call of a turn whose text was not kept: still shown
                turns.append({"index": len(turns), "segments": [], "calls": []})
            turns[call.turn]["calls"].append(view)
        frames = [_origin_box(m, [0.0, 0.0, float(im.width), float(im.height)])
                  for m, im in zip(traj.image_to_origin, traj.images)]
        sampled = int(sum(traj.response_mask))
        return cls(
            uid=traj.uid, sample_index=traj.sample_index, question=task.question, answer=task.answer,
            reward=float(breakdown.total), correct=bool(breakdown.correct), terms=dict(breakdown.terms),
            stats=dict(breakdown.stats), judge_failed=bool(breakdown.judge_failed), stop_reason=traj.stop_reason,
            task_type=task.task_type, data_source=task.data_source, required_ops=list(task.required_ops),
            answer_box=list(task.answer_box) if task.answer_box is not None else None, turns=turns,
            images=list(traj.images), image_parent=list(traj.image_parent), image_on_origin=frames,
            tokens={"prompt": len(traj.prompt_ids), "response": len(traj.response_ids), "sampled": sampled,
                    "inserted": len(traj.response_ids) - sampled},
            metrics=dict(traj.metrics),
        )
