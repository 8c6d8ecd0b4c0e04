"""Fixtures of the agent tests: processors and codecs of both tiny architectures, the real sandbox."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def processors(tiny_qwen25, tiny_qwen3):
    from transformers import AutoProcessor

    return {"qwen2_5_vl": AutoProcessor.from_pretrained(tiny_qwen25),
            "qwen3_vl": AutoProcessor.from_pretrained(tiny_qwen3)}


@pytest.fixture(scope="session")
def codecs(processors):
    from cv_ray.agent.chat import ChatCodec

    return {family: ChatCodec(p) for family, p in processors.items()}


@pytest.fixture(scope="session")
def sandbox_tools():
    """The real sandbox (a local SandboxPool of 2 warm workers) behind the loop's ToolRunner interface."""
    from cv_ray.agent.tool_runner import LocalToolRunner
    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=10.0)) as pool:
        yield LocalToolRunner(pool)
