"""Fixtures of the sandbox tests: a real pool (real zygotes, real hardened children) and real photos."""

from __future__ import annotations

import pytest
from PIL import Image

#: Set in this process before any pool starts: no sandboxed code may ever see it.
HOST_SECRET = "cvray-host-secret-7f3a9c"

#: The stdout limit of the pools the escape suite attacks: large enough that a whole environment
#: (a CI machine's runs to several thousand characters) is never cut before a leaked secret.
ESCAPE_STDOUT_CHARS = 100_000


@pytest.fixture(scope="session")
def host_secret() -> str:
    return HOST_SECRET


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real photograph (scikit-image's astronaut), 256x192 RGB, not symmetric in any direction."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256)).crop((0, 32, 256, 224))


@pytest.fixture(scope="session")
def pool():
    """A two-worker pool shared by the sandbox tests (started after the host secret is set)."""
    import os

    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    os.environ["CVRAY_TEST_SECRET"] = HOST_SECRET
    cfg = SandboxConfig(workers_per_executor=2, timeout_s=2.0, memory_mb=512, max_output_pixels=2048 * 2048,
                        max_stdout_chars=ESCAPE_STDOUT_CHARS)
    with SandboxPool(cfg) as p:
        yield p
