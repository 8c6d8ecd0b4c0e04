"""The byte protocol between the trusted parent and a sandbox child. Nothing is ever unpickled.

Each child has its own pair of pipes (small frames: header, code, JSON metadata) and its own
shared-memory buffer (a sealed memfd that cannot shrink or grow) for the pixels, so a 1024x1024
image crosses with one copy each way and one wake-up of the other side instead of dozens of pipe
round trips. A buffer outlives its child: once the child is dead the parent zeroes every page
that holds data (:func:`scrub_shared_buffer`) and the zygote hands it to a later child, whose
pixels then land in pages that are already there (first touches of fresh pages cost more than
the copy itself on a VM).

Request (parent -> child)::

    header  <4s I I I I B B>    magic b"CVQ2", code_len, width, height, pixel_len, mode_code,
                                keep_alive
            then code_len bytes of UTF-8 code on the pipe; the pixels (row-major) are in
            shared memory at offset 0.

Response (child -> parent)::

    header  <4s I I I I B>    magic b"CVR1", meta_len, width, height, pixel_len, mode_code
            then meta_len bytes of JSON metadata (ok, error, error_class, stdout, traced ops,
            tracer_errors) on the pipe; the pixels (pixel_len 0 when there is no image) are in
            shared memory.

Images travel as raw pixels in one of three modes (L, RGB, RGBA) rather than PNG: encoding a
1024x1024 PNG costs more CPU than the typical job itself, and raw pixels are simpler to check
than a decompressor's input. The reader of each frame checks the magic, every length against
hard caps and the shared buffer's size, and that ``pixel_len == width * height * bands(mode)``
before it touches the payload, and parses the JSON metadata under limits (size, nesting depth,
length of a number; no NaN or Infinity), so a child that writes garbage gets a ``ProtocolError``
and nothing else: no recursion error, no huge integer, no allocation beyond the caps.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

REQUEST_MAGIC = b"CVQ2"
RESPONSE_MAGIC = b"CVR1"
_REQUEST_HEADER = struct.Struct("<4sIIIIBB")
_RESPONSE_HEADER = struct.Struct("<4sIIIIB")

#: Wire code of each image mode and its bytes per pixel. Other modes are converted before sending.
MODE_CODES: dict[str, int] = {"L": 1, "RGB": 2, "RGBA": 3}
MODE_BANDS: dict[str, int] = {"L": 1, "RGB": 3, "RGBA": 4}
_CODE_MODES = {code: mode for mode, code in MODE_CODES.items()}

MAX_CODE_BYTES = 1 << 20
"""Hard cap on the code's bytes in a frame (the pool's own limit on characters is far lower)."""
MAX_META_BYTES = 1 << 20
"""Hard cap on the JSON metadata (stdout is capped in the child, traced ops are bounded); a pool
passes its own, lower cap (:func:`meta_bytes_cap`)."""
MAX_META_DEPTH = 8
"""Deepest nesting of JSON arrays and objects in the metadata (it needs 4: ``{"traced": [{"box": [...]}]}``)."""
MAX_NUMBER_CHARS = 40
"""Longest number literal in the metadata (a float's repr is at most 24 characters)."""
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Hard cap on the pixels of any image in a frame, whatever a pool's own (lower) limit."""


class ProtocolError(Exception):
    """A frame broke the protocol (bad magic, a length over its cap, truncated bytes)."""


@dataclass
class Request:
    code: str
    image: Image.Image
    keep_alive: bool
    """True in session mode: the child serves further requests on the same pipes."""


@dataclass
class Response:
    meta: dict[str, Any]
    """Untrusted JSON written by the child; the pool validates every field it uses."""
    image: Image.Image | None


def wire_image(image: Image.Image) -> Image.Image:
    """The image converted to a mode the protocol carries (L, RGB or RGBA), keeping alpha if any."""
    if image.mode in MODE_CODES:
        return image
    if image.mode == "1":
        return image.convert("L")
    has_alpha = "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def _check_image_header(width: int, height: int, pixel_len: int, mode_code: int) -> str | None:
    """The image's mode after checking the header fields against each other and the caps."""
    if pixel_len == 0 and width == 0 and height == 0 and mode_code == 0:
        return None
    mode = _CODE_MODES.get(mode_code)
    if mode is None:
        raise ProtocolError(f"unknown image mode code {mode_code}")
    if width == 0 or height == 0 or width * height > MAX_IMAGE_PIXELS:
        raise ProtocolError(f"image size {width}x{height} outside the protocol's limits")
    if pixel_len != width * height * MODE_BANDS[mode]:
        raise ProtocolError(f"pixel length {pixel_len} does not match {width}x{height} {mode}")
    return mode


def create_shared_buffer(size: int) -> int:
    """A memfd of ``size`` bytes, sealed so that neither side can shrink or grow it (a shrink
    would make the other side's reads fault). Returns its descriptor."""
    fd = os.memfd_create("cv_ray-pixels", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def map_shared_buffer(fd: int) -> mmap.mmap:
    """Map a shared pixel buffer (its whole size) read-write."""
    return mmap.mmap(fd, os.fstat(fd).st_size)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte ranges of a memfd that hold data, as the kernel reports them
    (``SEEK_DATA`` / ``SEEK_HOLE``: every page any process wrote; holes read as zeros)."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after position
                return
            raise
        position = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, position


def scrub_shared_buffer(fd: int, view: memoryview, max_dirty_bytes: int) -> bool:
    """Zero every page of a shared buffer that holds data, so the next child to map it sees zeros only.

    Which pages hold data comes from the kernel (:func:`data_extents`), whatever the last child
    claims it wrote. Returns False, zeroing nothing, when more than ``max_dirty_bytes`` hold data:
    the caller then drops the buffer (freeing its pages) rather than keep that much memory warm.
    """
    extents, dirty = [], 0
    for start, end in data_extents(fd, len(view)):
        extents.append((start, end))
        dirty += end - start
        if dirty > max_dirty_bytes:
            return False
    if extents:
        pixels = np.frombuffer(view, dtype=np.uint8)
        for start, end in extents:
            pixels[start:end] = 0
        del pixels  # release the buffer export before anyone closes the mapping
    return True


def _put_pixels(image: Image.Image, shm: memoryview) -> int:
    pixels = image.tobytes()
    if len(pixels) > len(shm):
        raise ProtocolError(f"image of {len(pixels)} bytes does not fit the {len(shm)}-byte shared buffer")
    shm[:len(pixels)] = pixels
    return len(pixels)


def _take_image(mode: str, width: int, height: int, pixel_len: int, shm: memoryview) -> Image.Image:
    if pixel_len > len(shm):
        raise ProtocolError(f"pixel length {pixel_len} exceeds the {len(shm)}-byte shared buffer")
    return Image.frombytes(mode, (width, height), shm[:pixel_len])


def encode_request(code: str, image: Image.Image, keep_alive: bool, shm: memoryview) -> list[bytes]:
    """Put the pixels in ``shm``; return the request frame to write on the pipe (header, code)."""
    image = wire_image(image)
    code_bytes = code.encode("utf-8", errors="surrogatepass")
    if len(code_bytes) > MAX_CODE_BYTES:
        raise ProtocolError(f"code of {len(code_bytes)} bytes exceeds the protocol cap")
    pixel_len = _put_pixels(image, shm)
    header = _REQUEST_HEADER.pack(REQUEST_MAGIC, len(code_bytes), image.width, image.height, pixel_len,
                                  MODE_CODES[image.mode], int(keep_alive))
    return [header, code_bytes]


def encode_response(meta: dict[str, Any], image: Image.Image | None, shm: memoryview) -> list[bytes]:
    """Put the pixels (if any) in ``shm``; return the response frame (header, JSON metadata)."""
    meta_bytes = json.dumps(meta, ensure_ascii=True).encode("ascii")
    if image is None:
        return [_RESPONSE_HEADER.pack(RESPONSE_MAGIC, len(meta_bytes), 0, 0, 0, 0), meta_bytes]
    pixel_len = _put_pixels(image, shm)
    header = _RESPONSE_HEADER.pack(RESPONSE_MAGIC, len(meta_bytes), image.width, image.height, pixel_len,
                                   MODE_CODES[image.mode])
    return [header, meta_bytes]


def write_frame(fd: int, buffers: list[bytes]) -> None:
    """Write every buffer fully (blocking); a reader that went away raises BrokenPipeError."""
    for buf in buffers:
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view):]


def read_exact(fd: int, size: int, deadline: float | None = None) -> bytearray | None:
    """Exactly ``size`` bytes from ``fd``; None on EOF before the first byte.

    With a ``deadline`` (``time.monotonic()`` seconds) the wait is bounded and TimeoutError is
    raised when it passes; EOF in the middle of the frame raises ProtocolError.
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no data on fd {fd} before the deadline")
        n = os.readv(fd, [view[got:]])
        if n == 0:
            if got == 0:
                return None
            raise ProtocolError(f"stream ended after {got} of {size} bytes")
        got += n
    return buf


def read_request(fd: int, shm: memoryview) -> Request | None:
    """The next request on ``fd`` (child side, blocking); None when the parent closed the pipe."""
    raw = read_exact(fd, _REQUEST_HEADER.size)
    if raw is None:
        return None
    magic, code_len, width, height, pixel_len, mode_code, keep_alive = _REQUEST_HEADER.unpack(raw)
    if magic != REQUEST_MAGIC or code_len > MAX_CODE_BYTES:
        raise ProtocolError("bad request header")
    mode = _check_image_header(width, height, pixel_len, mode_code)
    if mode is None:
        raise ProtocolError("a request must carry an image")
    code = bytes(read_exact(fd, code_len) or b"").decode("utf-8", errors="surrogatepass")
    image = _take_image(mode, width, height, pixel_len, shm)
    return Request(code=code, image=image, keep_alive=bool(keep_alive))


def read_response(fd: int, deadline: float, max_pixels: int, shm: memoryview,
                  max_meta_bytes: int = MAX_META_BYTES) -> Response | None:
    """The child's response (parent side); None when the child closed the pipe without writing.

    Raises ProtocolError on a malformed frame and TimeoutError when ``deadline`` passes. The
    JSON metadata is parsed under limits (:func:`parse_meta`) but not interpreted here; the pixels
    are checked against ``max_pixels`` (the pool's limit) before they are read.
    """
    raw = read_exact(fd, _RESPONSE_HEADER.size, deadline)
    if raw is None:
        return None
    magic, meta_len, width, height, pixel_len, mode_code = _RESPONSE_HEADER.unpack(raw)
    if magic != RESPONSE_MAGIC:
        raise ProtocolError("bad response magic")
    if meta_len > min(max_meta_bytes, MAX_META_BYTES):
        raise ProtocolError(f"metadata of {meta_len} bytes exceeds the cap")
    mode = _check_image_header(width, height, pixel_len, mode_code)
    if mode is not None and width * height > max_pixels:
        raise ProtocolError(f"image of {width}x{height} exceeds the pool's pixel limit")
    meta_raw = read_exact(fd, meta_len, deadline) if meta_len else bytearray()
    if meta_raw is None:
        raise ProtocolError("response ended before its metadata")
    meta = parse_meta(bytes(meta_raw))
    image = _take_image(mode, width, height, pixel_len, shm) if mode is not None else None
    return Response(meta=meta, image=image)


def meta_bytes_cap(max_stdout_chars: int) -> int:
    """The metadata a child may send: its capped stdout (up to 12 bytes per character once JSON
    escapes a non-BMP character), the error text, and 64 traced ops, with room to spare."""
    return min(MAX_META_BYTES, 12 * max_stdout_chars + (128 << 10))


#: A JSON string literal (escapes included); removed before the nesting depth is measured.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENING = frozenset(b"[{")


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[`` / ``{`` outside string literals, or the first depth past
    ``MAX_META_DEPTH`` (linear time, no recursion; an attack stops at its ninth bracket)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for code in brackets:
        depth += 1 if code in _OPENING else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_META_DEPTH:
                break
    return deepest


def _number(text: str, convert: Any) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(text)} characters")
    return convert(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_meta(raw: bytes) -> dict[str, Any]:
    """A response's JSON metadata, parsed under limits: ASCII only, nesting at most
    ``MAX_META_DEPTH``, numbers at most ``MAX_NUMBER_CHARS`` long, no NaN / Infinity, an object at
    the top. Anything else raises ProtocolError (never RecursionError or a huge-int ValueError)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"metadata is not ASCII: {exc}") from None
    if _json_depth(raw) > MAX_META_DEPTH:
        raise ProtocolError(f"metadata nests deeper than {MAX_META_DEPTH} levels")
    try:
        meta = json.loads(text, parse_int=lambda t: _number(t, int), parse_float=lambda t: _number(t, float),
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"metadata is not acceptable JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("metadata is not a JSON object")
    return meta
