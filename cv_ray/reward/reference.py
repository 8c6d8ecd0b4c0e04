"""The reference release's reward, reproduced exactly: ``reward.reference_compat=true``.

The reference (ByteDance-BandAI/CodeVision) spreads its reward over five files; each function here
names the one it follows. With the LLM judge as the only outside input, :func:`score_group_reference`
gives the reference's per-sample total (stored as float32, as the reference stores it) and every
term the reference exposes, quirks included:

* answer: ``recipe/codevision/reward.py`` (``extract_answer``, ``are_answers_equivalent``,
  ``compute_score``): the last ``<answer>…</answer>``, else the text after the last ``<answer>``,
  else the last line; its own number/letter rules decide first, the judge only after them;
* format: ``verl/workers/reward_manager/uvtr.py`` (``_compute_format_reward``): tag counts, not
  nesting;
* tool use: ``reference_tools.py`` (the agent loop reads ops from the code's text);
* the dense terms and the total: ``verl/experimental/agent_loop/agent_loop.py``
  (``_compute_tool_reward_for_sample`` and the helpers it calls), with the required ops and the
  answer box read from the reference row's raw ``extra_info`` (``transform``; ``bbox`` or
  ``bbox_2d``) exactly as ``tool_agent_loop.py`` passes them on.

Pure functions, no I/O. The fixed reward (``dense.py``) departs from this on purpose; every
departure is listed in docs/reward.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from cv_ray.reward.config import RewardConfig
from cv_ray.reward.outcome import SampleOutcome
from cv_ray.reward.reference_tools import ReferenceToolUse, reference_tool_use
from cv_ray.types import CORE_OPS, ORIENTATION_OPS, RewardBreakdown, Task

#: The reference's tolerance for answers that are numbers or fractions.
FRACTION_TOLERANCE = 1e-4
#: Its last-line fallback gives up on texts of this many lines or more.
MAX_FALLBACK_LINES = 500

_CLOSED_TOOL_RESPONSE = re.compile(r"<tool_response>.*?</tool_response>", re.DOTALL)
_ANSWER_CONTENT = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_ANSWER_AT_END = re.compile(r"<answer>.*?</answer>\s*$", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER_IN_THINK = re.compile(r"<think>.*?<answer>", re.DOTALL)
_CHOICE_LETTER = re.compile(r"\b([A-D])\b")
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")
#: The reference judge's task families, by keywords in ``data_source`` (its prompt per family).
#: Its keywords are matched against the lower-cased source, so the mixed-case ones never match.
_JUDGE_FAMILIES = (
    ("ocr", ("ocr", "optical", "text_recognition", "IAM-line", "CASIA", "Hiertext")),
    ("math", ("math", "mathematics", "arithmetic", "algebra", "geometry", "calculus")),
    ("code", ("code", "programming", "coding", "algorithm", "implementation")),
)


# ---------------------------------------------------------------------------------------------
# Answer and format (recipe/codevision/reward.py, verl/workers/reward_manager/uvtr.py)


def strip_tool_responses(text: str) -> str:
    """The text without closed ``<tool_response>…</tool_response>`` blocks (an unclosed one stays)."""
    return _CLOSED_TOOL_RESPONSE.sub("", text)


def extract_answer(text: str) -> str | None:
    """``reward.py: extract_answer``: the last closed answer, else what follows the last
    ``<answer>``, else the last line (None for an empty text or one of 500 lines or more)."""
    if not text:
        return None
    cleaned = strip_tool_responses(text)
    closed = _ANSWER_CONTENT.findall(cleaned)
    if closed:
        return closed[-1].strip()
    pieces = cleaned.strip().split("<answer>")
    if len(pieces) > 1:
        return pieces[-1].strip()
    lines = cleaned.strip().splitlines()
    return lines[-1].strip() if lines and len(lines) < MAX_FALLBACK_LINES else None


def _rule_pick(prediction: str, truth: str) -> str | None:
    """``reward.py: verify_answer_rule``: for a truth A-D, the last standalone capital A-D of the
    upper-cased answer (so a lone "a" is choice A); otherwise the answer as a float, or the last
    number written in it."""
    if not prediction:
        return None
    upper = prediction.upper()
    if str(truth).upper() in ("A", "B", "C", "D"):
        letters = _CHOICE_LETTER.findall(upper)
        return letters[-1] if letters else None
    try:
        return str(float(prediction))
    except ValueError:
        numbers = _NUMBER.findall(upper)
        return numbers[-1] if numbers else None


def answers_match(prediction: Any, truth: Any) -> bool:
    """``reward.py: are_answers_equivalent``: the reference's rules, before any judge.

    Both must be strings (a ground truth stored as a number never matches by rule). Equal as
    floats; else (when either is no float) equal as text; else the picked letter or number equals
    the stripped truth (case-insensitive) or is within 1e-4 of it as a fraction.
    """
    if not isinstance(prediction, str) or not isinstance(truth, str):
        return False
    try:
        if float(prediction) == float(truth):
            return True
    except ValueError:
        if prediction == truth:
            return True
    picked = _rule_pick(prediction, truth)
    if picked is None:
        return False
    truth_text = truth.strip()
    if picked.upper() == truth_text.upper():
        return True
    try:
        return abs(float(Fraction(picked)) - float(Fraction(truth_text))) <= FRACTION_TOLERANCE
    except (ValueError, ZeroDivisionError, OverflowError):
        return False


def judge_task_type(data_source: str) -> str:
    """``llmjudge.py: LLMJudgeClient._get_task_type`` mapped onto our judge prompts (code -> general)."""
    source = data_source.lower()
    for family, keywords in _JUDGE_FAMILIES:
        if any(keyword in source for keyword in keywords):
            return family if family in ("ocr", "math") else "general"
    return "general"


def format_reward(text: str) -> float:
    """``uvtr.py: _compute_format_reward``: tool responses removed and stripped, the text starts with
    ``<think>``, has as many ``<think>`` as ``</think>`` (at least one), exactly one
    ``<answer>…</answer>``, ends with one, and no think block holding an ``<answer>`` overlaps it.
    Nesting and order are not checked."""
    stripped = strip_tool_responses(text).strip()
    if not stripped.startswith("<think>"):
        return 0.0
    opened = stripped.count("<think>")
    if opened == 0 or opened != stripped.count("</think>"):
        return 0.0
    answers = list(_ANSWER_BLOCK.finditer(stripped))
    if len(answers) != 1 or not _ANSWER_AT_END.search(stripped):
        return 0.0
    start, end = answers[0].span()
    for think in _THINK_BLOCK.finditer(stripped):
        overlaps = think.start() < start < think.end() or think.start() < end < think.end()
        if overlaps and _ANSWER_IN_THINK.search(stripped[think.start():think.end()]):
            return 0.0
    return 1.0


def reference_verdict(sample: SampleOutcome, task: Task) -> bool:
    """The reference's rule verdict without a judge (a judge-less reference scores the rest 0)."""
    answer = extract_answer(sample.response_text)
    return answer is not None and answers_match(answer, reference_ground_truth(task))


# ---------------------------------------------------------------------------------------------
# What the reference row asks for (tool_agent_loop.py: run; agent_loop.py: _expected_transforms)


def reference_ground_truth(task: Task) -> Any:
    """The ground truth as the reference row stored it (a number stays a number), else the task's."""
    raw = task.extra.get("reference")
    if isinstance(raw, dict) and "ground_truth" in raw:
        return raw["ground_truth"]
    return task.answer


def expected_ops(transform: Any) -> set[str]:
    """``agent_loop.py: _expected_transforms``: the fix for each name of ``transform``.

    A dict gives its keys, a list its items (as text), a string itself (so a comma-separated string
    is one name). ``rotate_X`` needs ``rotate_(360-X)`` when that is a quarter turn and is dropped
    otherwise or when X is no integer; every other name (flips, ``crop``, ``none``, ``""``) is
    required as written.
    """
    if isinstance(transform, dict):
        names = {str(key) for key in transform}
    elif isinstance(transform, (list, tuple)):
        names = {str(item) for item in transform}
    elif isinstance(transform, str):
        names = {transform}
    else:
        names = set()
    required: set[str] = set()
    for name in names:
        if not name.startswith("rotate_"):
            required.add(name)
            continue
        try:
            inverse = (360 - int(name.split("_")[1]) % 360) % 360
        except ValueError:
            continue
        if inverse in (90, 180, 270):
            required.add(f"rotate_{inverse}")
    return required


def reference_targets(task: Task) -> tuple[set[str], Any]:
    """The required ops and the answer box the reference scores against.

    For a reference-layout row (``Task.extra["reference"]``, kept by the reader) they come from its
    raw ``transform`` and ``bbox`` (or, only when the row has no ``bbox`` field, ``bbox_2d``); a
    box that is not a list counts as no box. Our own tasks give their fixes and box directly.
    """
    raw = task.extra.get("reference")
    if not isinstance(raw, dict):
        return set(task.required_ops), task.answer_box
    box = raw.get("bbox", raw.get("bbox_2d"))
    return expected_ops(raw.get("transform")), list(box) if isinstance(box, (list, tuple)) else None


# ---------------------------------------------------------------------------------------------
# The dense terms (agent_loop.py)


def _iou(a: Sequence[Any], b: Sequence[Any]) -> float:
    """``_best_crop_iou.iou``: its arithmetic, in its order (an empty union divides by 1e-6)."""
    ax1, ay1, ax2, ay2 = map(float, a)
    bx1, by1, bx2, by2 = map(float, b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / (union if union > 0 else 1e-6)


def best_crop_iou(answer_box: Any, boxes: Sequence[Sequence[float]]) -> float:
    """``_best_crop_iou``: the best IoU of the boxes with four values; 0 when the answer box is not
    four numbers."""
    best = 0.0
    try:
        for box in boxes:
            if isinstance(box, (list, tuple)) and len(box) == 4:
                best = max(best, _iou(answer_box, box))
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return best


def mandatory_term(required: set[str], used: set[Any], answer_box: Any, boxes: Sequence[Sequence[float]]
                   ) -> tuple[float, float | None]:
    """``_mandatory_reward``: required non-crop ops used / |E|, plus IoU / |E| when crop is required,
    some crop was read and the row has a box (no box: the crop earns 0), capped at 1; and the IoU."""
    value = 0.0
    if required:
        value = len((required - {"crop"}) & used) / len(required)
    best: float | None = None
    if "crop" in required and "crop" in used and answer_box is not None:
        best = best_crop_iou(answer_box, boxes)
        value += best / len(required)
    return (min(value, 1.0) if required else value), best


def necessity_terms(correct: Sequence[bool], used_tool: Sequence[bool]) -> list[float]:
    """The group term R_necessity, one value per sample (``_compute_tool_reward_group_stats`` and its
    use; the fixed variant uses it too).

    Paid only when some samples used no tool and fewer than 2 of those were correct: then every
    correct tool-using sample gets max(0, accuracy with tools − accuracy without tools).
    """
    with_tool = sum(used_tool)
    right_with = sum(c and t for c, t in zip(correct, used_tool))
    without = len(correct) - with_tool
    right_without = sum(c and not t for c, t in zip(correct, used_tool))
    accuracy_with = right_with / with_tool if with_tool > 0 else 0.0
    accuracy_without = right_without / without if without > 0 else 0.0
    gain = max(0.0, accuracy_with - accuracy_without) if without > 0 else 0.0
    return [gain if c and t and right_without < 2 else 0.0 for c, t in zip(correct, used_tool)]


def ops_tool_use(sample: SampleOutcome) -> ReferenceToolUse:
    """For a sample built from ops alone (no call text): its op names and the crop boxes in the frame
    the code wrote them (``frame_box``, else the reported box), every call counted."""
    boxes = []
    for op in sample.ops:
        box = op.frame_box if op.frame_box is not None else op.raw_box
        if op.name == "crop" and box is not None:
            boxes.append(tuple(box))
    return ReferenceToolUse(tuple(op.name for op in sample.ops), tuple(boxes), code_count=sample.num_code_calls,
                            errors=sample.num_tool_errors)


def sample_tool_use(sample: SampleOutcome) -> ReferenceToolUse:
    """The reference's reading of a sample's tool use: as resolved (LLM judge included), else from its
    calls' text without a judge, else from its ops."""
    if sample.tool_use is not None:
        return sample.tool_use
    if sample.calls:
        return reference_tool_use(sample.calls)
    return ops_tool_use(sample)


def score_group_reference(task: Task, samples: Sequence[SampleOutcome], cfg: RewardConfig) -> list[RewardBreakdown]:
    """``_post_aggregate_tool_rewards`` for one group: the reference's terms and float32 total.

    ``terms`` hold the unweighted terms (``exact``/``emerge`` as 0/1: the reference's R_exact and
    R_emerge are these times ``exact_bonus``/``emerge_bonus``); the total is computed in the
    reference's grouping and rounded to float32, so it equals the weighted sum within float32.
    """
    required, answer_box = reference_targets(task)
    uses = [sample_tool_use(s) for s in samples]
    verdicts = [s.correct if s.correct is not None else reference_verdict(s, task) for s in samples]
    necessity = necessity_terms(verdicts, [use.used_any_tool for use in uses])
    breakdowns = []
    for sample, use, correct, necessity_value in zip(samples, uses, verdicts, necessity):
        used = set(use.ops)
        mandatory, iou = mandatory_term(required, used, answer_box, use.crop_boxes)
        acc = 1.0 if correct else 0.0
        if "crop" in required and mandatory < cfg.crop_gate:
            acc *= mandatory
            necessity_value = 0.0
        allowance = max(cfg.free_calls, len(required))
        terms = {
            "acc": acc,
            "fmt": format_reward(sample.response_text),
            "mandatory": mandatory,
            "necessity": necessity_value,
            "exact": 1.0 if (required & CORE_OPS) and required & CORE_OPS == used & CORE_OPS else 0.0,
            "emerge": 1.0 if correct and used - CORE_OPS else 0.0,
            "usage": float(use.code_count) - allowance if use.code_count >= allowance else 0.0,
            "spurious": float(len(used & ORIENTATION_OPS)) if not required & ORIENTATION_OPS else 0.0,
        }
        outcome = cfg.w_acc * terms["acc"] + cfg.w_fmt * terms["fmt"]
        process = (cfg.alpha * terms["mandatory"] + cfg.beta * terms["necessity"] + cfg.exact_bonus * terms["exact"]
                   + cfg.emerge_bonus * terms["emerge"])
        total = outcome + process - cfg.gamma * (terms["usage"] + terms["spurious"])
        stats = {"iou": iou or 0.0, "calls": float(use.code_count), "tool_errors": float(use.errors),
                 "exec": use.exec_ratio}
        breakdowns.append(RewardBreakdown(total=float(np.float32(total)), terms=terms, stats=stats,
                                          correct=bool(correct), judge_failed=sample.judge_failed))
    return breakdowns
