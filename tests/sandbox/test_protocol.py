"""The byte protocol: round trips through real pipes, and every malformed frame is refused."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest
from PIL import Image

from cv_ray.sandbox import protocol


@pytest.fixture()
def shm():
    """A real sealed shared buffer, mapped as the parent and the child map it."""
    fd = protocol.create_shared_buffer(4096)
    mapping = protocol.map_shared_buffer(fd)
    os.close(fd)
    view = memoryview(mapping)
    yield view
    view.release()
    mapping.close()


def test_shared_buffer_is_sealed():
    import fcntl

    fd = protocol.create_shared_buffer(4096)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # a child that shrank it would make the parent's reads fault
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        os.close(fd)


def _pipe_roundtrip(buffers: list[bytes], reader):
    r, w = os.pipe()
    try:
        protocol.write_frame(w, buffers)
        os.close(w)
        w = -1
        return reader(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_request_roundtrip_keeps_code_and_pixels(shm):
    image = Image.fromarray(np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3))
    request = _pipe_roundtrip(protocol.encode_request("result = img  # é", image, True, shm),
                              lambda fd: protocol.read_request(fd, shm))
    assert request.code == "result = img  # é"
    assert request.keep_alive is True
    assert request.image.mode == "RGB" and np.array_equal(np.asarray(request.image), np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "CMYK"])
def test_other_modes_travel_as_l_rgb_or_rgba(shm, mode):
    image = Image.new(mode, (3, 2))
    request = _pipe_roundtrip(protocol.encode_request("", image, False, shm), lambda fd: protocol.read_request(fd, shm))
    assert request.image.mode in ("L", "RGB", "RGBA") and request.image.size == (3, 2)


def test_response_roundtrip(shm):
    image = Image.fromarray(np.full((4, 7), 9, dtype=np.uint8))
    meta = {"ok": True, "stdout": "hi", "traced": [{"op": "crop"}]}
    response = _pipe_roundtrip(protocol.encode_response(meta, image, shm),
                               lambda fd: protocol.read_response(fd, time.monotonic() + 5, 100, shm))
    assert response.meta == meta
    assert response.image.size == (7, 4) and np.all(np.asarray(response.image) == 9)


def test_response_without_image_and_eof(shm):
    response = _pipe_roundtrip(protocol.encode_response({"ok": False}, None, shm),
                               lambda fd: protocol.read_response(fd, time.monotonic() + 5, 100, shm))
    assert response.image is None and response.meta == {"ok": False}
    assert _pipe_roundtrip([], lambda fd: protocol.read_response(fd, time.monotonic() + 5, 100, shm)) is None


def test_images_larger_than_the_shared_buffer_are_refused(shm):
    with pytest.raises(protocol.ProtocolError, match="does not fit"):
        protocol.encode_request("", Image.new("RGB", (200, 200)), False, shm)


def _header(magic=b"CVR1", meta_len=2, width=2, height=2, pixel_len=12, mode=2):
    return struct.pack("<4sIIIIB", magic, meta_len, width, height, pixel_len, mode)


@pytest.mark.parametrize("frame, reason", [
    ([_header(magic=b"EVIL"), b"{}"], "magic"),
    ([_header(pixel_len=13), b"{}"], "does not match"),
    ([_header(mode=9), b"{}"], "mode"),
    ([_header(meta_len=protocol.MAX_META_BYTES + 1)], "exceeds the cap"),
    ([_header(width=100, height=100, pixel_len=30000)], "pixel limit"),  # over the reader's 1000-pixel limit
    ([_header(width=40, height=40, pixel_len=4800), b"{}"], "shared buffer"),  # 1600 pixels, but over 4096 bytes
    ([_header(width=0, height=5, pixel_len=0)], "outside"),
    ([_header(), b"[]"], "not a JSON object"),
    ([_header(), b"{x"], "not acceptable JSON"),
    ([_header(meta_len=10), b"{}"], "ended after"),
])
def test_malformed_responses_are_refused(shm, frame, reason):
    with pytest.raises(protocol.ProtocolError, match=reason):
        _pipe_roundtrip(frame, lambda fd: protocol.read_response(fd, time.monotonic() + 5, 5000, shm))


def test_read_times_out_on_a_silent_writer(shm):
    r, w = os.pipe()
    try:
        with pytest.raises(TimeoutError):
            protocol.read_response(r, time.monotonic() + 0.05, 100, shm)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("meta, reason", [
    (b"[" * 20_000 + b"]" * 20_000, "nests deeper"),  # fits a pipe buffer: the writer does not block
    (b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}", "nests deeper"),
    (b'{"ok": true, "x": ' + b"9" * 5000 + b"}", "a number of 5000 characters"),
    (b'{"x": 1.' + b"5" * 100 + b"}", "a number of 102 characters"),
    (b'{"x": NaN}', "NaN is not a JSON number"),
    (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
    ('{"x": "é"}'.encode(), "not ASCII"),
])
def test_metadata_is_parsed_under_limits(shm, meta, reason):
    """Nesting, number length and constants are bounded before Python's parser sees them.

    Mutant: ``parse_meta`` without the depth pre-scan (``json.loads`` then recurses into a
    RecursionError the pool never catches) or without the number hooks (a 5000-digit integer
    raises a ValueError about integer conversion, or is converted at quadratic cost).
    """
    with pytest.raises(protocol.ProtocolError, match=reason):
        _pipe_roundtrip([_header(meta_len=len(meta), width=0, height=0, pixel_len=0, mode=0), meta],
                        lambda fd: protocol.read_response(fd, time.monotonic() + 5, 5000, shm))


def test_metadata_within_the_limits_is_read_whole(shm):
    meta = b'{"ok": true, "s": "[[[[[[[[[[\\"]]", "traced": [{"op": "crop", "box": [1.5, 2, -3e2, 4]}]}'
    response = _pipe_roundtrip([_header(meta_len=len(meta), width=0, height=0, pixel_len=0, mode=0), meta],
                               lambda fd: protocol.read_response(fd, time.monotonic() + 5, 5000, shm))
    assert response.meta == {"ok": True, "s": '[[[[[[[[[["]]', "traced": [{"op": "crop", "box": [1.5, 2, -300.0, 4]}]}


def test_a_pool_caps_the_metadata_below_the_protocol_cap(shm):
    meta = b'{"pad": "' + b"x" * 3000 + b'"}'
    with pytest.raises(protocol.ProtocolError, match="exceeds the cap"):
        _pipe_roundtrip([_header(meta_len=len(meta), width=0, height=0, pixel_len=0, mode=0), meta],
                        lambda fd: protocol.read_response(fd, time.monotonic() + 5, 5000, shm, max_meta_bytes=2048))
