"""Answer extraction and the rule checkers, as tables of (answer, truth, expected verdict)."""

from __future__ import annotations

import threading

import pytest

from cv_ray.reward.answer import (
    check_answer,
    choice_index,
    extract_answer,
    math_equivalent,
    parse_number,
    rule_verdict,
    strip_tool_responses,
)


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>B</answer>", "B"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last one, stripped
    ("<answer>5</answer><tool_response><answer>9</answer></tool_response>", "5"),  # tool text is not the model's
    ("<answer>5</answer><tool_response><answer>9</answer>", "5"),  # an unclosed tool response runs to the end
    ("no tags at all", None),
    ("<answer>unclosed", None),
    ("<answer>line one\nline two</answer>", "line one\nline two"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strip_tool_responses_keeps_the_rest():
    assert strip_tool_responses("a<tool_response>x\ny</tool_response>b") == "ab"


@pytest.mark.parametrize("text, value", [
    ("12", 12.0), ("-3.5", -3.5), ("1,234", 1234.0), ("3/4", 0.75), ("40%", 40.0), (".5", 0.5), ("5.", 5.0),
    ("$7$", 7.0), ("1/0", None), ("12,34", None), ("twelve", None), ("", None), ("3 apples", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("answer, choices, index", [
    ("A", None, 0), ("(B)", None, 1), ("B.", None, 1), ("C) a red car", None, 2), ("b", None, 1),
    ("a red car", ["a blue car", "a red car"], 1),  # the option text itself; "a" is not read as a letter
    ("A red car", ["a blue car", "a red car"], 1),   # the option text wins over a leading capital A
    ("E", ["x", "y", "z", "w"], None),                # beyond the options
    ("Bob", None, None),
])
def test_choice_index(answer, choices, index):
    assert choice_index(answer, choices) == index


# (answer, truth, task_type, choices, expected correct, deciding rule)
RULE_TABLE = [
    (None, "7", "count", None, False, "no_answer"),
    ("   ", "7", "general", None, False, "no_answer"),
    # OCR: case- and space-insensitive; a different text is for the judge to decide
    ("Hello  World", "hello world", "ocr", None, True, "text"),
    ("HELLOWORLD.", "hello world", "ocr", None, True, "text"),
    ("hello word", "hello world", "ocr", None, None, "undecided"),
    # count: the last number of the answer, exactly
    ("There are 5 cats", "5", "count", None, True, "number"),
    ("5.0", "5", "count", None, True, "number"),
    ("6", "5", "count", None, False, "mismatch"),
    ("many", "5", "count", None, False, "mismatch"),
    # choice: letters in every spelling, or the option text
    ("(B)", "B", "choice", ["cat", "dog"], True, "choice"),
    ("B. dog", "B", "choice", ["cat", "dog"], True, "choice"),
    ("dog", "B", "choice", ["cat", "dog"], True, "choice"),
    ("A", "B", "choice", ["cat", "dog"], False, "mismatch"),
    ("the dog", "B", "choice", ["cat", "dog"], False, "mismatch"),
    # numbers with tolerance, fractions, percentages
    ("0.33333", "1/3", "general", None, True, "number"),  # |0.33333 - 1/3| / (1/3) = 1e-5 < 1e-4
    ("0.333", "1/3", "general", None, None, "undecided"),  # relative error 1e-3: not equal, judge may say
    ("40%", "0.4", "general", None, True, "number"),
    ("0.4", "40%", "general", None, True, "number"),
    ("1,000", "1000", "general", None, True, "number"),
    # math: cheap rules first; an expression they cannot compare is undecided
    ("0.5", "1/2", "math", None, True, "number"),
    ("\\boxed{12.0}", "12", "math", None, True, "number"),
    ("0.7", "3/4", "math", None, False, "mismatch"),  # two plain numbers: decided without math-verify
    ("\\frac{1}{2}", "0.5", "math", None, None, "undecided"),
    # general text
    ("Paris", "paris", "general", None, True, "text"),
    ("the capital is Paris", "Paris", "general", None, None, "undecided"),
]


@pytest.mark.parametrize("answer, truth, task_type, choices, correct, rule", RULE_TABLE)
def test_rule_verdict(answer, truth, task_type, choices, correct, rule):
    verdict = rule_verdict(answer, truth, task_type, choices)
    assert (verdict.correct, verdict.rule) == (correct, rule)


@pytest.mark.parametrize("answer, truth, correct", [
    ("\\frac{1}{2}", "0.5", True),
    ("$\\frac{6}{4}$", "3/2", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\sqrt{2}", "1.41421356", True),
    ("\\frac{1}{3}", "0.5", False),
])
def test_math_verify_decides_what_the_cheap_rules_cannot(answer, truth, correct):
    verdict = check_answer(answer, truth, "math")
    assert verdict.correct is correct
    assert verdict.rule == ("math_verify" if correct else "mismatch")


def test_math_verify_refuses_to_run_off_the_main_thread():
    # Its SIGALRM timeouts cannot work there; a hang on 9^{9^{9^9}} is worse than no verdict.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_equivalent("\\frac{1}{2}", "0.5", 2)))
    worker.start()
    worker.join()
    assert results == [None]
    assert math_equivalent("\\frac{1}{2}", "0.5", 2) is True


def test_math_verify_times_out_on_a_power_tower():
    # Comparing 9^(9^(9^9)) with 3 would run for hours; the 1 s timeout turns it into "not equal".
    assert check_answer("9^{9^{9^9}}", "3", "math", math_timeout_s=1).correct is False
