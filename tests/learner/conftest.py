"""Learner test fixtures: the tiny models' processors."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def processor25(tiny_qwen25):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen25)


@pytest.fixture(scope="session")
def processor3(tiny_qwen3):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen3)
