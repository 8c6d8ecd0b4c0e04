"""The format reward R_fmt, exactly as the reference defines it (pure function).

With tool responses removed, the response text must

1. start with ``<think>`` (leading whitespace allowed);
2. have balanced think tags, at least one pair, properly nested (never a ``</think>`` before its
   ``<think>``, never a think block opened inside another);
3. hold exactly one ``<answer>…</answer>``, at the end (trailing whitespace allowed), and
4. not inside a think block: the answer opens after the last ``</think>``.

Then R_fmt is 1, else 0.
"""

from __future__ import annotations

import re

from cv_ray.reward.answer import strip_tool_responses

_THINK_TAG = re.compile(r"</?think>")


def _think_tags_balanced(text: str) -> bool:
    depth = 0
    pairs = 0
    for tag in _THINK_TAG.findall(text):
        if tag == "<think>":
            if depth:  # a think block opened inside another
                return False
            depth = 1
        else:
            if not depth:
                return False
            depth = 0
            pairs += 1
    return depth == 0 and pairs >= 1


def format_reward(response_text: str) -> float:
    """1.0 when the response follows the think/answer format above, else 0.0."""
    text = strip_tool_responses(response_text).strip()
    if not text.startswith("<think>") or not _think_tags_balanced(text):
        return 0.0
    if text.count("<answer>") != 1 or text.count("</answer>") != 1 or not text.endswith("</answer>"):
        return 0.0
    answer_start = text.index("<answer>")
    if answer_start < text.rindex("</think>"):
        return 0.0
    return 1.0
