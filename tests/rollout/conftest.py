"""Fixtures of the rollout tests: HF engines of both tiny models (the sandbox fixture is in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_engines(tiny_qwen25, tiny_qwen3):
    from cv_ray.rollout.hf_engine import HFEngine

    return {"qwen2_5_vl": HFEngine(str(tiny_qwen25)), "qwen3_vl": HFEngine(str(tiny_qwen3))}
