"""Fixtures of the rollout tests: the real sandbox behind the loop's interface, HF engines of both tiny models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sandbox_tools():
    from cv_ray.agent.tool_runner import LocalToolRunner
    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=10.0)) as pool:
        yield LocalToolRunner(pool)


@pytest.fixture(scope="session")
def hf_engines(tiny_qwen25, tiny_qwen3):
    from cv_ray.rollout.hf_engine import HFEngine

    return {"qwen2_5_vl": HFEngine(str(tiny_qwen25)), "qwen3_vl": HFEngine(str(tiny_qwen3))}
