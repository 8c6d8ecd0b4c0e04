"""The NumPy adapter: arrays made from traced images keep their lineage, and views are geometry.

``np.array`` / ``np.asarray`` / ... of a traced image or array are bound to the same node; the
turns and flips of a PIL image go through the traced ``np.asarray`` so that their result is a view
of a traced array. Views themselves need no hook: :func:`view_geometry` reads a view's crop, turn,
flip or transpose from its data pointer and strides when the recorder resolves it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from cv_ray.sandbox.tracing.registry import Patch
from cv_ray.types import Matrix3


def _on_array(tracer, out: Any, args: tuple, kwargs: dict) -> None:
    src = args[0] if args else kwargs.get("a", kwargs.get("object"))
    if isinstance(out, np.ndarray) and out.ndim in (2, 3):
        tracer.emit_same(tracer.node_of(src), out)


def _image_first(tracer, fn: Callable) -> Callable:
    """numpy's turns and flips of a PIL image go through the traced ``np.asarray``.

    The result is a view of that array, resolved when it is consumed; no record here.
    """

    @functools.wraps(fn)
    def image_first(m: Any, *args: Any, **kwargs: Any) -> Any:
        if tracer.tracing and isinstance(m, Image.Image):
            m = np.asarray(m)
        return fn(m, *args, **kwargs)

    return image_first


PATCHES: tuple[Patch, ...] = (
    *(Patch(np, name, _on_array) for name in ("array", "asarray", "asanyarray", "ascontiguousarray", "copy")),
    *(Patch(np, name, wrapper=_image_first) for name in ("rot90", "flip", "fliplr", "flipud", "transpose", "swapaxes")),
)


def view_geometry(view: np.ndarray, base: np.ndarray) -> tuple[Matrix3, bool] | None:
    """The out->in matrix of ``view`` (a numpy view of ``base``), and whether it reorders channels.

    ``base`` must be C-contiguous (H, W[, C]). Each of the view's first two axes must step by
    exactly one row or one column of the base (either sign): crops, flips, turns and transposes.
    Derivation: view element (i, j) sits at byte ``off + i*s0 + j*s1`` of the base, i.e. at base
    row ``r0 + i*dr0 + j*dr1`` and column ``c0 + i*dc0 + j*dc1``. In continuous coordinates the
    view pixel centre (j+.5, i+.5) maps to the base centre, which gives the matrix below.
    """
    if base.ndim not in (2, 3) or view.ndim not in (2, 3) or view.dtype != base.dtype or not base.flags.c_contiguous:
        return None
    row_stride, col_stride = base.strides[0], base.strides[1]
    if row_stride == col_stride:
        return None
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if not 0 <= offset < base.nbytes:
        return None
    r0, rest = divmod(offset, row_stride)
    c0, rest = divmod(rest, col_stride)
    ch0 = rest // base.itemsize
    steps = []
    for axis in (0, 1):
        stride = view.strides[axis]
        step = {row_stride: (1, 0), -row_stride: (-1, 0), col_stride: (0, 1), -col_stride: (0, -1)}.get(stride)
        if step is None:
            return None
        steps.append(step)
    (dr0, dc0), (dr1, dc1) = steps
    if (dr0 == 0) == (dr1 == 0):
        return None
    channels = base.shape[2] if base.ndim == 3 else 1
    if view.ndim == 3:
        if base.ndim != 3:
            return None
        same = view.shape[2] == channels and view.strides[2] == base.itemsize and ch0 == 0
        channels_changed = not same
    else:
        channels_changed = base.ndim == 3
    matrix = [[float(dc1), float(dc0), c0 + 0.5 - (dc1 + dc0) * 0.5],
              [float(dr1), float(dr0), r0 + 0.5 - (dr1 + dr0) * 0.5],
              [0.0, 0.0, 1.0]]
    return matrix, channels_changed
