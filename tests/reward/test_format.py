"""The fixed format reward R_fmt: one case per clause of its definition. The reference's (tag counts, no
nesting) and how the two differ: test_reference_parity.py, class 3."""

from __future__ import annotations

import pytest

from cv_ray.reward.format import format_reward

TOOL = '<tool_call>\n{"name": "code_image_tool"}\n</tool_call>'


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>B</answer>", 1.0),
    ("  <think>a</think>\n<answer>B</answer>\n", 1.0),                 # surrounding whitespace is fine
    (f"<think>a</think>{TOOL}<tool_response>img</tool_response><think>b</think><answer>B</answer>", 1.0),
    # a tool response is removed first, even if it holds tags
    ("<think>a</think><tool_response><answer>x</answer></tool_response><answer>B</answer>", 1.0),
    ("I think <think>a</think><answer>B</answer>", 0.0),               # does not start with <think>
    ("<answer>B</answer>", 0.0),                                         # no think block
    ("<think>a<answer>B</answer>", 0.0),                                 # unbalanced
    ("<think>a</think></think><think><answer>B</answer>", 0.0),          # counts equal, order wrong
    ("<think>a<think>b</think></think><answer>B</answer>", 0.0),         # nested think blocks
    ("<think>a</think><answer>A</answer><answer>B</answer>", 0.0),       # two answers
    ("<think>a</think><answer>B</answer> done", 0.0),                    # answer not at the end
    ("<think>a</think>no answer", 0.0),
    ("<think><answer>B</answer></think>", 0.0),                          # not at the end, inside think
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected
