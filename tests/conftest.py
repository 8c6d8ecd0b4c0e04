"""Shared test fixtures: tiny models and their processors and codecs (built once per session), the real
sandbox behind the agent loop's interface, a local Ray cluster, GPU gating."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_TINY_SOURCES = [REPO / "cv_ray/models/tiny.py", REPO / "cv_ray/models/chat_template.jinja",
                 REPO / "cv_ray/agent/prompts.py"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tiny_cache_dir() -> Path:
    """Tiny models are keyed by the hash of the code that builds them, so edits rebuild them."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _TINY_SOURCES)).hexdigest()[:12]
    return REPO / ".cache" / f"tiny-models-{digest}"


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    """{family: model directory} for both tiny architectures."""
    from cv_ray.models.tiny import FAMILIES, ensure_tiny_model

    root = _tiny_cache_dir()
    if not root.exists():
        for stale in root.parent.glob("tiny-models-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return {family: ensure_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_qwen25(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen2_5_vl"]


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen3_vl"]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the session, overcommitting CPUs so many actors fit on 2 cores."""
    import ray

    from cv_ray.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=16)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def long_runs(request, ray_local, tmp_path_factory):
    """The quickstart, the asynchronous run from its SFT model and the demo's smoke run, started together
    (tests/long_runs.py); only those whose tests were collected."""
    from long_runs import LongRuns, wanted_runs

    runs = LongRuns(tmp_path_factory.mktemp("long_runs"), ray_local.get_runtime_context().gcs_address,
                    wanted_runs(request.session.items))
    yield runs
    runs.close()


@pytest.fixture(scope="session")
def processors(tiny_qwen25, tiny_qwen3):
    """{family: processor} of both tiny architectures (the checkpoints' own image bounds)."""
    from transformers import AutoProcessor

    return {"qwen2_5_vl": AutoProcessor.from_pretrained(tiny_qwen25),
            "qwen3_vl": AutoProcessor.from_pretrained(tiny_qwen3)}


@pytest.fixture(scope="session")
def processor25(processors):
    return processors["qwen2_5_vl"]


@pytest.fixture(scope="session")
def processor3(processors):
    return processors["qwen3_vl"]


@pytest.fixture(scope="session")
def codecs(processors):
    """{family: ChatCodec} with the default prompt and the tool schema."""
    from cv_ray.agent.chat import ChatCodec

    return {family: ChatCodec(p) for family, p in processors.items()}


@pytest.fixture(scope="session")
def sandbox_tools():
    """The real sandbox (a local SandboxPool of 2 warm workers) behind the agent loop's ToolRunner interface."""
    from cv_ray.agent.tool_runner import LocalToolRunner
    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=10.0)) as pool:
        yield LocalToolRunner(pool)

