"""Answer extraction and rule-based answer checking (pure functions, no I/O).

The final answer is the content of the last ``<answer>…</answer>`` of the response, with tool
responses removed first (a tool response is text the model did not write). Checking is a small
registry keyed by ``Task.task_type``; each checker returns a :class:`Verdict`:

* ``correct=True``  — a rule matched;
* ``correct=False`` — a rule decided the answer is wrong (no LLM judge can change that: a missing
  answer, a choice letter that is not the right one, a count that is not the right number);
* ``correct=None``  — no rule could decide (free text that differs, a math expression the cheap rules
  cannot compare). The caller may try ``math-verify`` (:func:`math_equivalent`) for math and then an
  LLM judge; with neither, an undecided answer counts as wrong.

:func:`check_answer` runs the whole rule chain synchronously, ``math-verify`` included.
``math-verify`` guards itself with ``SIGALRM`` timeouts, which only work on a process's main
thread; off the main thread the math step is skipped (the verdict stays undecided) rather than risk
a hang on a model-written ``9^{9^{9^9}}``. The reward actor therefore runs it in a helper process.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

_TOOL_RESPONSE = re.compile(r"<tool_response>.*?(?:</tool_response>|\Z)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?\s*%?")
_NUMBER_IN_TEXT = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|[-+]?\.\d+%?")
_CHOICE_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")
_SURROUNDING_PUNCT = "\"'`“”‘’.,;:!?"
_LATEX_WRAPPERS = re.compile(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")
_BOXED = re.compile(r"\\boxed\{(.*)\}")

#: Relative tolerance for numeric answers (the reference compares fractions within 1e-4).
NUMBER_REL_TOL = 1e-4
#: Absolute tolerance so that answers near zero compare sensibly.
NUMBER_ABS_TOL = 1e-9
#: Longer math answers are not given to math-verify: sympy time grows with the expression.
MATH_MAX_CHARS = 300


@dataclass(frozen=True)
class Verdict:
    """The outcome of the answer rules for one sample."""

    correct: bool | None
    """True / False when a rule decided; None when no rule could (ask math-verify or a judge)."""
    rule: str
    """Which rule decided, for metrics: ``no_answer``, ``text``, ``number``, ``choice``,
    ``math_verify``, ``mismatch`` (decided wrong) or ``undecided``."""


def strip_tool_responses(text: str) -> str:
    """The text without ``<tool_response>…</tool_response>`` blocks (an unclosed one runs to the end)."""
    if "<tool_response>" not in text:
        return text
    return _TOOL_RESPONSE.sub("", text)


def extract_answer(text: str) -> str | None:
    """The stripped content of the last ``<answer>…</answer>`` outside tool responses, or None."""
    found = _ANSWER.findall(strip_tool_responses(text))
    return found[-1].strip() if found else None


def normalize_text(text: str) -> str:
    """Case-, space- and surrounding-punctuation-insensitive form (OCR answers, free text)."""
    return "".join(text.casefold().split()).strip(_SURROUNDING_PUNCT)


def parse_number(text: str) -> float | None:
    """The value of a string that is *only* a number: ``12``, ``-3.5``, ``1,234``, ``3/4``, ``40%``.

    Percentages return the percent value (``40%`` → 40.0); :func:`numbers_match` also accepts the
    fraction form. Returns None for anything else (including division by zero).
    """
    candidate = _LATEX_WRAPPERS.sub("", text.strip()).strip().rstrip(".")
    if not candidate or not _NUMBER.fullmatch(candidate) or not any(c.isdigit() for c in candidate):
        return None
    candidate = candidate.replace(",", "").replace(" ", "").rstrip("%")
    if "/" in candidate:
        numerator, denominator = candidate.split("/")
        if float(denominator) == 0:
            return None
        return float(Fraction(numerator) / Fraction(denominator))
    return float(candidate)


def last_number(text: str) -> float | None:
    """The last number written anywhere in ``text`` (``"there are 5 cats"`` → 5.0), or None."""
    found = _NUMBER_IN_TEXT.findall(text)
    return parse_number(found[-1]) if found else None


def numbers_match(answer: float, truth: float, answer_is_percent: bool, truth_is_percent: bool) -> bool:
    """Equal within tolerance; a percentage on either side may also be read as a fraction (40% = 0.4)."""
    candidates = [answer] + ([answer / 100] if answer_is_percent and not truth_is_percent else [])
    truths = [truth] + ([truth / 100] if truth_is_percent and not answer_is_percent else [])
    return any(math.isclose(a, t, rel_tol=NUMBER_REL_TOL, abs_tol=NUMBER_ABS_TOL) for a in candidates for t in truths)


def choice_index(answer: str, choices: Sequence[str] | None) -> int | None:
    """Which option an answer names: ``A``, ``(B)``, ``B.``, ``B) text``, or the option text itself.

    A lone letter is accepted in either case (``b``); a letter followed by more text must be upper
    case, so that ``a cat`` is not read as option A. Letters beyond the options are rejected.
    """
    text = answer.strip()
    if choices:
        normalized = normalize_text(text)
        for index, option in enumerate(choices):
            if normalized == normalize_text(option):
                return index
    match = _CHOICE_LETTER.match(text)
    if match and (match.group(1).isupper() or len(text.strip("().:")) == 1):
        index = ord(match.group(1).upper()) - ord("A")
        if index < (len(choices) if choices else 26):
            return index
    return None


def _check_text(answer: str, truth: str) -> Verdict:
    if normalize_text(answer) == normalize_text(truth):
        return Verdict(True, "text")
    return Verdict(None, "undecided")


def _check_number(answer: str, truth: str, whole_answer_only: bool) -> Verdict | None:
    """Numeric comparison when the ground truth is a number; None when it is not."""
    truth_value = parse_number(truth)
    if truth_value is None:
        return None
    answer_value = parse_number(answer)
    if answer_value is None and not whole_answer_only:
        answer_value = last_number(answer)
    if answer_value is None:
        return Verdict(None, "undecided")
    same = numbers_match(answer_value, truth_value, answer.rstrip(". ").endswith("%"), truth.strip().endswith("%"))
    return Verdict(True, "number") if same else Verdict(False, "mismatch")


def check_ocr(answer: str, truth: str, choices: Sequence[str] | None) -> Verdict:
    """OCR: the text read, case- and space-insensitive; otherwise undecided (a judge may accept)."""
    return _check_text(answer, truth)


def check_count(answer: str, truth: str, choices: Sequence[str] | None) -> Verdict:
    """Counting: the last number of the answer equals the truth exactly (within float noise)."""
    verdict = _check_number(answer, truth, whole_answer_only=False)
    if verdict is None:
        return _check_text(answer, truth)
    return verdict if verdict.correct is not None else Verdict(False, "mismatch")


def check_choice(answer: str, truth: str, choices: Sequence[str] | None) -> Verdict:
    """Multiple choice: the option named by the answer is the truth's (a letter or the option text)."""
    truth_index = choice_index(truth, choices)
    if truth_index is None:
        return _check_text(answer, truth)
    answer_index = choice_index(answer, choices)
    if answer_index == truth_index:
        return Verdict(True, "choice")
    return Verdict(False, "mismatch")


def check_math(answer: str, truth: str, choices: Sequence[str] | None) -> Verdict:
    """Math, cheap rules only: text, then numbers. Two plain numbers are decided here (math-verify
    would only agree, 100x slower); anything else, like ``\\frac{1}{2}``, is left undecided."""
    for candidate in (answer, _unbox(answer)):
        if normalize_text(candidate) == normalize_text(truth):
            return Verdict(True, "text")
        verdict = _check_number(candidate, truth, whole_answer_only=True)
        if verdict is not None and verdict.correct is not None:
            return verdict
    return Verdict(None, "undecided")


def check_general(answer: str, truth: str, choices: Sequence[str] | None) -> Verdict:
    """Anything else: text, then the option named (with choices), then numbers; else undecided."""
    if normalize_text(answer) == normalize_text(truth):
        return Verdict(True, "text")
    if choices:
        truth_index = choice_index(truth, choices)
        if truth_index is not None and choice_index(answer, choices) == truth_index:
            return Verdict(True, "choice")
    verdict = _check_number(answer, truth, whole_answer_only=False)
    if verdict is not None and verdict.correct:
        return verdict
    return Verdict(None, "undecided")


def _unbox(text: str) -> str:
    match = _BOXED.search(text)
    return match.group(1) if match else text


Checker = Callable[[str, str, "Sequence[str] | None"], Verdict]

#: Rule checkers by ``Task.task_type``. Unknown types use ``general``.
CHECKERS: dict[str, Checker] = {
    "ocr": check_ocr,
    "count": check_count,
    "choice": check_choice,
    "math": check_math,
    "general": check_general,
}


def rule_verdict(answer: str | None, truth: str, task_type: str, choices: Sequence[str] | None = None) -> Verdict:
    """The cheap rules (no math-verify, no judge) for one extracted answer."""
    if answer is None or not answer.strip():
        return Verdict(False, "no_answer")
    return CHECKERS.get(task_type, check_general)(answer, truth, choices)


def math_equivalent(answer: str, truth: str, timeout_s: int) -> bool | None:
    """Whether math-verify finds the two expressions equal; None when it cannot run safely.

    Must run on a main thread (math-verify's timeouts are SIGALRM-based); elsewhere, and for
    answers longer than :data:`MATH_MAX_CHARS`, returns None instead of risking a hang.
    """
    if threading.current_thread() is not threading.main_thread() or len(answer) > MATH_MAX_CHARS:
        return None
    from math_verify import parse, verify  # imported lazily: sympy takes ~1 s to import

    def parsed(text: str) -> list:
        # math-verify finds LaTeX only between delimiters; a bare answer like `x^2+1` needs them.
        return parse(text, parsing_timeout=timeout_s) or parse(f"${text}$", parsing_timeout=timeout_s)

    gold, target = parsed(truth), parsed(answer)
    if not gold or not target:
        return None
    return bool(verify(gold, target, timeout_seconds=timeout_s))


def check_answer(answer: str | None, truth: str, task_type: str, choices: Sequence[str] | None = None,
                 math_timeout_s: int = 2) -> Verdict:
    """All rules, synchronously: the cheap rules, then math-verify for undecided math answers."""
    verdict = rule_verdict(answer, truth, task_type, choices)
    if verdict.correct is None and task_type == "math" and answer is not None:
        same = math_equivalent(answer, truth, math_timeout_s)
        if same is not None:
            return Verdict(same, "math_verify" if same else "mismatch")
    return verdict
