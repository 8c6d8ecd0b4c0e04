"""Gather concurrent generation requests into batches (one batch at a time, off the event loop).

Many agent loops run as asyncio tasks in one worker. Each awaits ``submit`` for its next turn; the
batcher collects whatever is pending, runs it as one batch in a worker thread (so tool calls and
other trajectories keep making progress on the event loop), and meanwhile queues the requests
that arrive for the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cv_ray.agent.generation import GenerationOutput, GenerationRequest


class RequestBatcher:
    def __init__(self, run_batch: Callable[[list[GenerationRequest]], list[GenerationOutput]], max_batch_size: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        self.batch_sizes: list[int] = []
        """Size of every batch run so far (for metrics and tests)."""

    async def submit(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future = loop.create_future()
            self._pending.append((request, future))
            futures.append(future)
        if self._drainer is None or self._drainer.done() or self._drainer.get_loop() is not loop:
            self._drainer = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        while self._pending:
            # Yield once so that trajectories which are ready to submit join this batch.
            await asyncio.sleep(0)
            batch, self._pending = self._pending[: self._max_batch_size], self._pending[self._max_batch_size:]
            self.batch_sizes.append(len(batch))
            try:
                outputs = await asyncio.to_thread(self._run_batch, [request for request, _ in batch])
            except BaseException as exc:  # forwarded to every waiting trajectory, not swallowed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), output in zip(batch, outputs, strict=True):
                if not future.done():
                    future.set_result(output)
