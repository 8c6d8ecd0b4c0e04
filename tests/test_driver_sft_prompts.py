"""The SFT stage's check that its conversations were written under the rollout's system prompt."""

from __future__ import annotations

import logging

from cv_ray.driver import _warn_on_other_system_prompts
from cv_ray.types import SFTExample


def _example(uid: str, system: str | None) -> SFTExample:
    opening = [{"role": "system", "content": system}] if system is not None else []
    return SFTExample(uid=uid, messages=[*opening, {"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "<answer>a</answer>"}], images=[])


def test_conversations_under_another_system_prompt_are_counted_and_named(caplog):
    examples = [_example("same", "Short prompt."), _example("other", "A different prompt."),
                _example("none", None)]
    with caplog.at_level(logging.WARNING, logger="cv_ray.driver"):
        assert _warn_on_other_system_prompts(examples, "Short prompt.") == 1
    assert "1 of 3 conversations" in caplog.text and "rollout.system_prompt" in caplog.text
    caplog.clear()
    assert _warn_on_other_system_prompts(examples[:1], "Short prompt.") == 0
    assert caplog.text == ""
