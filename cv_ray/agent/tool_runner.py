"""What the agent loop needs from a sandbox, and a local adapter over a SandboxPool.

In a RolloutWorker the runner is a ``cv_ray.sandbox.SandboxGroup`` (Ray executors; its ``run`` is
already a coroutine). Without Ray (unit tests, the rollout benchmark, a local evaluation) a
:class:`LocalToolRunner` puts a thread-safe ``SandboxPool`` behind the same asynchronous interface.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from PIL import Image

from cv_ray.types import ExecResult


class ToolRunner(Protocol):
    async def run(self, code: str, images: list[Image.Image], image_index: int = 0,
                  session_id: str | None = None) -> ExecResult: ...

    def close_session(self, session_id: str) -> Any:
        """Forget a trajectory's session (may return an awaitable)."""


class LocalToolRunner:
    """A ``SandboxPool`` (blocking, thread-safe) as an asynchronous :class:`ToolRunner`."""

    def __init__(self, pool: Any):
        self.pool = pool

    async def run(self, code: str, images: list[Image.Image], image_index: int = 0,
                  session_id: str | None = None) -> ExecResult:
        return await asyncio.to_thread(self.pool.run, code, images, image_index, session_id)

    def close_session(self, session_id: str) -> None:
        self.pool.close_session(session_id)
