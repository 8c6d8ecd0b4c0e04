"""SandboxExecutor / SandboxGroup on a local Ray cluster: async calls, load balancing, sessions,
and an executor killed mid-request (the call is retried elsewhere; Ray restarts the actor)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from PIL import Image

from cv_ray.sandbox import SandboxGroup
from cv_ray.sandbox.config import SandboxConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(ray_local):
    # A generous timeout: the killed-executor test needs a call still running when the kill lands.
    cfg = SandboxConfig(num_executors=2, cpus_per_executor=1, workers_per_executor=1, timeout_s=60.0, memory_mb=512,
                        session="trajectory")
    g = SandboxGroup(cfg)
    yield g
    g.shutdown()


def test_group_runs_many_calls_concurrently_and_balances(group, photo):
    async def main():
        calls = [group.run("result = image.transpose(Image.Transpose.ROTATE_90)", [photo]) for _ in range(12)]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    want = np.asarray(photo.transpose(Image.Transpose.ROTATE_90))
    assert all(r.ok and np.array_equal(np.asarray(r.image), want) for r in results)
    served = [stats.get("ok", 0) for stats in group.stats()]
    assert sum(served) >= 12 and min(served) > 0, served


def test_group_checks_requests_locally(group, photo):
    r = asyncio.run(group.run("result = image", [photo], image_index=5))
    assert r.error_class == "image_index" and "the only valid image_index is 0" in r.error


def test_group_sessions_stick_to_one_executor(group, photo):
    async def main():
        first = await group.run("note = 'kept'\nresult = image", [photo], session_id="traj-1")
        second = await group.run("print(note)\nresult = image", [photo], session_id="traj-1")
        other = await group.run("print(note)", [photo], session_id="traj-2")
        group.close_session("traj-1")
        return first, second, other

    first, second, other = asyncio.run(main())
    assert first.ok and second.ok and second.stdout == "kept\n"
    assert other.error_class == "runtime" and "NameError" in other.error


def test_killed_executor_mid_request_is_retried_elsewhere(group, photo, ray_local):
    ray = ray_local

    async def main():
        # A slow call (seconds even on a fast CPU) is in flight on every executor; one executor is
        # killed under it as soon as its call is sent (no sleep: the group's in-flight count says when).
        slow = "import math\nx = 0\nfor i in range(10**7):\n    x += math.sqrt(i)\nresult = image"
        tasks = [asyncio.create_task(group.run(slow, [photo])) for _ in range(2)]
        while group._in_flight[0] == 0:  # the event: a call has been sent to executor 0
            await asyncio.sleep(0)
        ray.kill(group.actors[0], no_restart=False)
        return await asyncio.gather(*tasks)

    failures_before = group.actor_failures
    results = asyncio.run(main())
    assert all(r.ok for r in results), [r.error for r in results]
    assert group.actor_failures > failures_before
    # Ray restarts the killed executor; it serves again once its zygote is up.
    deadline = time.monotonic() + 60
    while True:
        try:
            layers = ray.get(group.actors[0].layers.remote(), timeout=30)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline
            time.sleep(1.0)
    assert all(info["ok"] for info in layers.values())
    r = ray.get(group.actors[0].run.remote("result = image", [photo]))
    assert r.ok
