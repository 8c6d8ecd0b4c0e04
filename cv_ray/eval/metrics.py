"""Robustness metrics over evaluated samples: pure functions, no I/O.

An :class:`EvalRecord` is one scored sample of one task in one mode (tools on or off). The functions
here aggregate records into the numbers of the report: accuracy per suite and per transform,
consistency across a question's variants, tool use, tool errors by class, turns, op precision and
recall against the task's required ops, and crop IoU against the answer box.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cv_ray.types import CORE_OPS


@dataclass
class EvalRecord:
    task_uid: str
    suite: str
    transform: str
    """The corruption of the task's image (`none`, `rotate_90`, ..., `flip_horizontal`, `blur`, ...)."""
    base_id: str
    """Variants of one base question share it (consistency is measured across them)."""
    with_tools: bool
    correct: bool
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    """Failed calls by error class (sandbox classes and parse classes)."""
    turns: int = 0
    ops_used: list[str] = field(default_factory=list)
    """Distinct ops applied by successful calls."""
    required_ops: list[str] = field(default_factory=list)
    crop_iou: float | None = None
    """Best IoU of the sample's crops (mapped to image 0) with the answer box; None if no crop or no box."""


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def accuracy_by(records: Sequence[EvalRecord], key: str) -> dict[str, float]:
    """Accuracy grouped by a record attribute (e.g. ``suite`` or ``transform``)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        groups[str(getattr(r, key))].append(r.correct)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def consistency(records: Sequence[EvalRecord]) -> float | None:
    """Fraction of base questions answered correctly in *every* one of their variants.

    Only base questions with at least two variants count (a single variant says nothing about
    robustness to the transform). With several samples per variant, a variant counts as correct
    when the majority of its samples are.
    """
    per_variant: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for r in records:
        per_variant[(r.base_id, r.transform)].append(r.correct)
    per_base: dict[str, list[bool]] = defaultdict(list)
    for (base, _), outcomes in per_variant.items():
        per_base[base].append(sum(outcomes) * 2 > len(outcomes))
    scored = [all(v) for v in per_base.values() if len(v) >= 2]
    return _mean(float(s) for s in scored)


def op_precision_recall(records: Sequence[EvalRecord], core_only: bool = True) -> tuple[float | None, float | None]:
    """Micro-averaged precision and recall of the ops used against the ops required.

    precision = |used ∩ required| / |used|, recall = |used ∩ required| / |required|, summed over
    records before dividing. ``core_only`` compares the six core ops (the robustness fixes).
    """
    hit = used_total = required_total = 0
    for r in records:
        used = set(r.ops_used)
        required = set(r.required_ops)
        if core_only:
            used &= CORE_OPS
            required &= CORE_OPS
        hit += len(used & required)
        used_total += len(used)
        required_total += len(required)
    precision = hit / used_total if used_total else None
    recall = hit / required_total if required_total else None
    return precision, recall


def summarize(records: Sequence[EvalRecord]) -> dict:
    """All report numbers for one mode (records of a single ``with_tools`` value)."""
    errors: Counter[str] = Counter()
    for r in records:
        errors.update(r.tool_errors)
    calls = sum(r.tool_calls for r in records)
    precision, recall = op_precision_recall(records)
    ious = [r.crop_iou for r in records if r.crop_iou is not None]
    crop_tasks = [r for r in records if "crop" in r.required_ops]
    return {
        "n": len(records),
        "accuracy": _mean(float(r.correct) for r in records),
        "accuracy_by_suite": accuracy_by(records, "suite"),
        "accuracy_by_transform": accuracy_by(records, "transform"),
        "consistency": consistency(records),
        "tool_use_rate": _mean(float(r.tool_calls > 0) for r in records),
        "tool_use_rate_by_transform": {
            t: _mean(float(r.tool_calls > 0) for r in records if r.transform == t)
            for t in sorted({r.transform for r in records})
        },
        "tool_calls_per_sample": calls / len(records) if records else None,
        "tool_error_rate": sum(errors.values()) / calls if calls else None,
        "tool_errors_by_class": dict(sorted(errors.items())),
        "mean_turns": _mean(r.turns for r in records),
        "op_precision": precision,
        "op_recall": recall,
        "crop_iou_mean": _mean(ious),
        "crop_rate_when_required": _mean(float(r.crop_iou is not None) for r in crop_tasks),
    }
