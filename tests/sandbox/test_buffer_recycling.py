"""Shared pixel buffers outlive their child: the parent zeroes every page holding data once the
child is dead, and only then does the zygote lend the buffer to another child."""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import pytest
from PIL import Image

from cv_ray.sandbox import SandboxPool, protocol, zygote_handle
from cv_ray.sandbox.config import SandboxConfig

BUFFER_BYTES = 64 << 20


@pytest.fixture
def buffer():
    fd = protocol.create_shared_buffer(BUFFER_BYTES)
    mapping = protocol.map_shared_buffer(fd)
    view = memoryview(mapping)
    yield fd, view
    view.release()
    mapping.close()
    os.close(fd)


def _pages_with_data(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512 // mmap.PAGESIZE


def _only_zeros(fd: int, view: memoryview) -> bool:
    """Whether every page holding data is zero (holes read as zeros; reading them through the
    mapping would allocate them, so only the data extents are read)."""
    pixels = np.frombuffer(view, dtype=np.uint8)
    return not any(pixels[start:end].any() for start, end in protocol.data_extents(fd, len(view)))


def test_scrub_zeroes_every_written_page_and_keeps_them(buffer):
    fd, view = buffer
    rng = np.random.default_rng(0)
    # what a child may leave anywhere in the buffer, not only where its result went
    for offset in (0, 3 * 2**20 + 17, 40 * 2**20 - 5, BUFFER_BYTES - 1):
        size = min(9000, BUFFER_BYTES - offset)
        view[offset:offset + size] = rng.integers(1, 256, size, dtype=np.uint8).tobytes()
    pages = _pages_with_data(fd)
    assert pages >= 4

    assert protocol.scrub_shared_buffer(fd, view, max_dirty_bytes=1 << 20)

    assert _pages_with_data(fd) == pages  # zeroed in place: the next child's pixels land in warm pages
    assert _only_zeros(fd, view)


def test_scrub_refuses_a_buffer_holding_too_much_data(buffer):
    fd, view = buffer
    view[:3 << 20] = b"\x07" * (3 << 20)

    assert not protocol.scrub_shared_buffer(fd, view, max_dirty_bytes=1 << 20)
    assert view[(3 << 20) - 1] == 7  # untouched: the caller drops such a buffer instead


def _settle(zygote: zygote_handle.ZygoteProcess, timeout: float = 10.0) -> None:
    """Wait until every released child is reported dead (and its buffer recycled)."""
    deadline = time.monotonic() + timeout
    while zygote._awaiting_exit and time.monotonic() < deadline:
        zygote._receive(0.05)
    assert not zygote._awaiting_exit


def test_pool_reuses_a_few_buffers_and_lends_them_zeroed():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(1024, 1024), (300, 200), (640, 480)] * 4]
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=10.0, memory_mb=1024)) as pool:
        for image in images:
            r = pool.run("result = image.transpose(Image.Transpose.ROTATE_90)", [image])
            assert r.ok, r.error
            assert np.array_equal(np.asarray(r.image), np.asarray(image.transpose(Image.Transpose.ROTATE_90)))
            assert [op["op"] for op in r.ops] == ["rotate_90"]
        zygote = pool._slots[0].zygote
        _settle(zygote)
        # 12 calls went through a handful of buffers (spare, running, awaiting its exit report)
        assert len(zygote._buffers) <= 4 and max(zygote._buffers) <= 5, sorted(zygote._buffers)
        # lent to the spare or waiting in the zygote: warm pages, all zeros
        assert sum(_pages_with_data(buffer.fd) for buffer in zygote._buffers.values()) >= 768
        for buffer in zygote._buffers.values():
            assert _only_zeros(buffer.fd, buffer.view), buffer.id


def test_pool_drops_buffers_holding_more_than_the_limit(monkeypatch):
    monkeypatch.setattr(zygote_handle, "RECYCLE_MAX_DIRTY_BYTES", 1 << 20)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=10.0, memory_mb=1024)) as pool:
        for _ in range(5):
            assert pool.run("result = image", [image]).ok
        zygote = pool._slots[0].zygote
        _settle(zygote)
        # every 3 MB buffer was closed instead of lent again: new ones kept being made
        assert max(zygote._buffers) >= 6 and len(zygote._buffers) <= 3, sorted(zygote._buffers)
