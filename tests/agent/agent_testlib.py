"""Helpers of the agent tests: code strings the model is scripted to write, a noise image, and a
delay-controlled in-process runner.

``SleepyTools`` exists only for the concurrency test: sandboxed code cannot sleep, and the test
needs tool calls of known durations. It returns the named image unchanged and logs every call.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from PIL import Image

from cv_ray.types import ExecResult

ROTATE_90 = "result = image.transpose(Image.ROTATE_90)"
CROP = "result = image.crop((8, 4, 40, 28))"
FAILING = "result = undefined_name"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class SleepyTools:
    def __init__(self, delays_s: tuple[float, ...]):
        self.delays_s = delays_s
        self.calls: list[tuple[float, float]] = []
        self.closed: list[str] = []
        self._started = 0

    async def run(self, code, images, image_index=0, session_id=None) -> ExecResult:
        started = time.perf_counter()
        delay = self.delays_s[self._started % len(self.delays_s)]  # call k (in start order) waits delays_s[k % n]
        self._started += 1
        await asyncio.sleep(delay)
        self.calls.append((started, time.perf_counter()))
        return ExecResult(ok=True, image=images[image_index].copy(), to_input=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])

    def close_session(self, session_id: str) -> None:
        self.closed.append(session_id)
