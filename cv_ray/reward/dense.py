"""The dense process reward of one GRPO group (pure: no Ray, no I/O, no judge).

For a task with required ops E and a sample that used ops U (see docs/reward.md):

    R_total = w_acc·R_acc + w_fmt·R_fmt + α·R_mandatory + β·R_necessity
              + b_exact·R_exact + b_emerge·R_emerge − γ·(C_usage + R_spurious)

Every term is stored unweighted in ``RewardBreakdown.terms`` (R_exact and R_emerge as 0/1
indicators; their weights are the bonuses 0.1 and 0.2); log-only numbers go to ``stats``. Two
variants, chosen by ``RewardConfig.reference_compat`` from :data:`VARIANTS`:

* ``fixed`` (default, this module): the ops the sandbox verified, of successful calls only, crop
  IoU in image 0's frame, R_emerge only for a non-core op other than ``resize``/``pad`` that changed
  the image, and our answer and format rules;
* ``reference`` (``reference.py``): the reference release's reward exactly, flaws included: ops
  read from the code's text, boxes in whatever frame the code wrote them, its answer, format and
  rounding rules.

Entry point: :func:`score_group`. The term functions below take plain numbers and sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cv_ray.geometry import iou
from cv_ray.reward.answer import check_answer, extract_answer
from cv_ray.reward.config import RewardConfig
from cv_ray.reward.format import format_reward
from cv_ray.reward.outcome import SampleOutcome, UsedOp
from cv_ray.reward.reference import necessity_terms, score_group_reference
from cv_ray.types import CORE_OPS, ORIENTATION_OPS, Box, RewardBreakdown, Task

#: Ops that never earn R_emerge in the fixed variant: resizing and padding show the model nothing new
#: (the sandbox reports every zoom as crop + resize, so paying for resize would pay for every zoom).
TRIVIAL_OPS: frozenset[str] = frozenset({"resize", "pad"})


def counts(op: UsedOp) -> bool:
    """Whether an op counts in the fixed variant: it reached the model (its call succeeded) and the
    sandbox verified it against the pixels."""
    return op.call_ok and op.verified


def emerges(op: UsedOp) -> bool:
    """Whether an op earns R_emerge in the fixed variant: a non-core op that did something new."""
    return op.name not in CORE_OPS and op.name not in TRIVIAL_OPS and op.changed


# ---------------------------------------------------------------------------------------------
# The terms, as pure functions of plain values.


def best_crop_iou(boxes: Sequence[Box | None], answer_box: Box) -> float:
    """Max IoU of the crop boxes with the answer box (0 without crops; a box of None scores 0)."""
    return max((iou(box, answer_box) for box in boxes if box is not None), default=0.0)


def mandatory_term(required: set[str], used: set[str], crop_score: float) -> float:
    """(required non-crop ops used + crop_score if crop is required) / |E|, capped at 1; 0 if E is empty.

    With nothing required the term is the same for every sample of the group, so its value does not
    move the group-normalised advantage; 0 keeps the maximum total honest.
    """
    if not required:
        return 0.0
    hits = len((required - {"crop"}) & used) + (crop_score if "crop" in required else 0.0)
    return min(1.0, hits / len(required))


def accuracy_term(correct: bool, crop_required: bool, mandatory: float, crop_gate: float) -> float:
    """1 if correct; when a crop is required and R_mandatory < gate, scaled by R_mandatory
    (a right answer read from the wrong region earns little)."""
    value = 1.0 if correct else 0.0
    if crop_required and mandatory < crop_gate:
        value *= mandatory
    return value


def exact_term(required: set[str], used: set[str]) -> float:
    """1 when the core ops used are exactly the core ops required (which must be non-empty)."""
    required_core = required & CORE_OPS
    return 1.0 if required_core and required_core == used & CORE_OPS else 0.0


def usage_term(num_calls: int, num_required: int, free_calls: int) -> float:
    """Calls beyond max(free_calls, |E|): C_usage = calls − allowance when calls ≥ allowance."""
    return float(max(0, num_calls - max(free_calls, num_required)))


def spurious_term(required: set[str], used: set[str]) -> float:
    """When no orientation fix is required: the number of distinct rotations/flips used."""
    if required & ORIENTATION_OPS:
        return 0.0
    return float(len(used & ORIENTATION_OPS))


# ---------------------------------------------------------------------------------------------


def term_weights(cfg: RewardConfig) -> dict[str, float]:
    """Signed weight of each unweighted term in the total (penalties negative)."""
    return {
        "acc": cfg.w_acc, "fmt": cfg.w_fmt, "mandatory": cfg.alpha, "necessity": cfg.beta,
        "exact": cfg.exact_bonus, "emerge": cfg.emerge_bonus, "usage": -cfg.gamma, "spurious": -cfg.gamma,
    }


def score_group_fixed(task: Task, samples: Sequence[SampleOutcome], cfg: RewardConfig) -> list[RewardBreakdown]:
    """The fixed variant for one group. Samples with ``correct=None`` are decided here by our answer
    rules (math-verify included; no judge)."""
    weights = term_weights(cfg)
    required = set(task.required_ops)
    crop_required = "crop" in required

    per_sample: list[tuple[dict[str, float], dict[str, float]]] = []
    verdicts: list[bool] = []
    gated: list[bool] = []
    for sample in samples:
        correct = sample.correct
        if correct is None:
            verdict = check_answer(extract_answer(sample.response_text), task.answer, task.task_type, task.choices,
                                   cfg.math_timeout_s)
            correct = bool(verdict.correct)
        counted = [op for op in sample.ops if counts(op)]
        used = {op.name for op in counted}
        crops = [op.box for op in counted if op.name == "crop"]
        if task.answer_box is not None:
            crop_score = best_crop_iou(crops, task.answer_box)
        else:  # no region to compare with: a crop counts as done
            crop_score = 1.0 if crops else 0.0
        mandatory = mandatory_term(required, used, crop_score)
        terms = {
            "acc": accuracy_term(correct, crop_required, mandatory, cfg.crop_gate),
            "fmt": format_reward(sample.response_text),
            "mandatory": mandatory,
            "exact": exact_term(required, used),
            "emerge": 1.0 if correct and any(emerges(op) for op in counted) else 0.0,
            "usage": usage_term(sample.num_code_calls, len(required), cfg.free_calls),
            "spurious": spurious_term(required, used),
        }
        calls, errors = sample.num_code_calls, sample.num_tool_errors
        stats = {"iou": crop_score, "calls": float(calls), "tool_errors": float(errors),
                 "exec": (calls - errors) / calls if calls else 0.0}
        per_sample.append((terms, stats))
        verdicts.append(correct)
        gated.append(crop_required and mandatory < cfg.crop_gate)

    necessity = necessity_terms(verdicts, [s.num_code_calls > 0 for s in samples])
    breakdowns = []
    for (terms, stats), correct, sample, necessity_value, gate in zip(per_sample, verdicts, samples, necessity, gated):
        # The crop gate discounts a right answer read from the wrong region; it earns no necessity either.
        terms["necessity"] = 0.0 if gate else necessity_value
        total = sum(weight * terms[name] for name, weight in weights.items())
        breakdowns.append(RewardBreakdown(total=total, terms=terms, stats=stats, correct=correct,
                                          judge_failed=sample.judge_failed))
    return breakdowns


Scorer = Callable[[Task, Sequence[SampleOutcome], RewardConfig], list[RewardBreakdown]]

#: The two variants of the reward (``reward.reference_compat`` picks ``reference``).
VARIANTS: dict[str, Scorer] = {"fixed": score_group_fixed, "reference": score_group_reference}


def score_group(task: Task, samples: Sequence[SampleOutcome], cfg: RewardConfig) -> list[RewardBreakdown]:
    """The reward of each sample of one GRPO group (all samples of ``task``), in order.

    Samples with ``correct=None`` are decided here by the variant's answer rules (no judge).
    ``terms``: the eight terms, unweighted; ``stats``: ``iou``, ``calls``, ``tool_errors``, ``exec``.
    """
    return VARIANTS["reference" if cfg.reference_compat else "fixed"](task, samples, cfg)


def mean_breakdown(breakdowns: Sequence[RewardBreakdown]) -> dict[str, float]:
    """Means over ``breakdowns`` of the total, every term, every statistic, ``correct`` and ``judge_failed``
    (metric names without a prefix: ``total``, ``acc``, ..., ``iou``, ``correct``, ``judge_failed``)."""
    if not breakdowns:
        return {}
    n = len(breakdowns)
    means = {"total": sum(b.total for b in breakdowns) / n,
             "correct": sum(b.correct for b in breakdowns) / n,
             "judge_failed": sum(b.judge_failed for b in breakdowns) / n}
    for field_name in ("terms", "stats"):
        for name in getattr(breakdowns[0], field_name):
            means[name] = sum(getattr(b, field_name)[name] for b in breakdowns) / n
    return means
