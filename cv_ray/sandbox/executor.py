"""The sandbox as Ray actors: ``SandboxExecutor`` (one pool per actor) and ``SandboxGroup`` (many).

Executors need CPUs only, so they can live on CPU-only nodes and scale apart from the GPUs
(``sandbox.num_executors``, ``sandbox.cpus_per_executor``). An executor is a thin shell around a
:class:`~cv_ray.sandbox.pool.SandboxPool`; it runs calls on a thread pool (``max_concurrency``) and
the pool queues them over its workers.

``SandboxGroup`` is the handle the rollout holds (it pickles, so it can be passed to rollout
actors). Its ``run`` is a coroutine that awaits the actor's reply, so many agent loops share one
event loop without blocking it. Calls go to the executor with the fewest calls in flight from this
handle; a session (``session="trajectory"``) always goes to the same executor. Executors are
created with ``max_restarts=-1``: one that dies is restarted by Ray, and a call that was in flight
on it is retried on another executor (up to ``sandbox.actor_retries`` times).

Usage::

    group = SandboxGroup(cfg.sandbox)        # after ray.init()
    result = await group.run(code, images, image_index=0, session_id=traj_uid)
    group.close_session(traj_uid)
    group.shutdown()
"""

from __future__ import annotations

import logging
import time
import zlib

import ray
from PIL import Image

from cv_ray.actor_group import ActorGroup, GroupShell
from cv_ray.sandbox import messages
from cv_ray.sandbox.config import SandboxConfig
from cv_ray.sandbox.pool import SandboxPool, check_request
from cv_ray.types import ExecResult

log = logging.getLogger(__name__)

#: Failures that mean "this executor is gone or restarting", never "the code failed".
_ACTOR_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, max_task_retries=0)
class SandboxExecutor:
    """A Ray actor owning one SandboxPool (``cfg.workers_per_executor`` zygotes)."""

    def __init__(self, cfg: SandboxConfig):
        self.pool = SandboxPool(cfg)

    def run(self, code: str, images: list[Image.Image], image_index: int = 0,
            session_id: str | None = None) -> ExecResult:
        return self.pool.run(code, images, image_index, session_id)

    def close_session(self, session_id: str) -> None:
        self.pool.close_session(session_id)

    def stats(self) -> dict[str, int]:
        return self.pool.stats()

    def layers(self) -> dict[str, dict]:
        return self.pool.layers

    def shutdown(self) -> None:
        self.pool.close()


class SandboxGroup(GroupShell):
    def __init__(self, cfg: SandboxConfig):
        """Start ``cfg.num_executors`` executors and wait until each has its zygotes ready."""
        cfg.validate()
        self.cfg = cfg
        # Threads beyond the pool's workers just wait in the pool's queue; a few per worker keep
        # every worker busy while results travel back.
        concurrency = max(4, 4 * cfg.workers_per_executor)
        self.actors = ActorGroup(
            SandboxExecutor, cfg.num_executors, args=(cfg,), name="sandbox executors",
            options=lambda i: {"num_cpus": cfg.cpus_per_executor, "max_concurrency": concurrency,
                               "scheduling_strategy": "SPREAD"},
            # An executor already dead has no zygotes left to stop (the group logs and moves on).
            on_shutdown=lambda executor: executor.shutdown.remote())
        self._actors = self.actors.actors
        self._in_flight = [0] * len(self._actors)
        self.actor_failures = 0
        """Calls that found their executor dead (each retried elsewhere), counted by this handle."""
        try:
            self.actors.get(self.actors.each(lambda executor: executor.layers.remote()))
        except BaseException:
            self.actors.shutdown()
            raise

    def _pick(self, session_id: str | None, tried: set[int]) -> int:
        candidates = [i for i in range(len(self._actors)) if i not in tried] or list(range(len(self._actors)))
        if session_id is not None and self.cfg.session == "trajectory":
            home = zlib.crc32(session_id.encode()) % len(self._actors)  # the same in every process
            return home if home in candidates else candidates[0]
        return min(candidates, key=lambda i: self._in_flight[i])

    async def run(self, code: str, images: list[Image.Image], image_index: int = 0,
                  session_id: str | None = None) -> ExecResult:
        """Run ``code`` on ``images[image_index]`` in some executor (awaitable; never raises for bad code)."""
        start = time.monotonic()
        refused = check_request(code, images, image_index, self.cfg.max_code_chars, self.cfg.max_output_pixels)
        if refused is not None:
            refused.seconds = time.monotonic() - start
            return refused
        tried: set[int] = set()
        for _ in range(self.cfg.actor_retries + 1):
            index = self._pick(session_id, tried)
            self._in_flight[index] += 1
            try:
                # Only the chosen image travels; the index was checked above.
                result = await self._actors[index].run.remote(code, [images[image_index]], 0, session_id)
            except _ACTOR_FAILURES as exc:
                self.actor_failures += 1
                tried.add(index)
                log.warning("sandbox executor %d failed (%s); retrying the call elsewhere", index, type(exc).__name__)
                continue
            finally:
                self._in_flight[index] -= 1
            result.seconds = time.monotonic() - start
            return result
        return ExecResult(ok=False, error=messages.sandbox_error(), error_class="sandbox",
                          seconds=time.monotonic() - start)

    def close_session(self, session_id: str) -> None:
        """End a session on its executor (fire-and-forget: does not block the event loop)."""
        if self.cfg.session == "trajectory":
            self._actors[self._pick(session_id, set())].close_session.remote(session_id)

    def stats(self) -> list[dict[str, int]]:
        """Per-executor call counts by outcome (blocking; for logging between steps)."""
        return self.actors.get(self.actors.each(lambda executor: executor.stats.remote()))

    def shutdown(self) -> None:
        """Stop every executor's zygotes, then the actors (idempotent)."""
        self.actors.shutdown()
