"""Pure 2-D geometry shared by the sandbox, the agent loop and the reward.

Conventions (see cv_ray/types.py): continuous pixel coordinates, boxes ``[x1, y1, x2, y2]`` with
exclusive ends, 3x3 row-major matrices acting on column vectors ``[x, y, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cv_ray.types import Box, Matrix3

IDENTITY: Matrix3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def identity() -> Matrix3:
    return [row[:] for row in IDENTITY]


def compose(a: Matrix3, b: Matrix3) -> Matrix3:
    """The matrix of "apply ``b``, then ``a``" (the product ``a @ b``)."""
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def apply(m: Matrix3, x: float, y: float) -> tuple[float, float]:
    """Map one point through ``m`` (affine: the last row is ``[0, 0, 1]``)."""
    return (m[0][0] * x + m[0][1] * y + m[0][2], m[1][0] * x + m[1][1] * y + m[1][2])


def map_box(m: Matrix3, box: Sequence[float]) -> Box:
    """The axis-aligned box covering the four mapped corners of ``box``."""
    x1, y1, x2, y2 = box
    corners = [apply(m, x, y) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))]
    xs = [c[0] for c in corners]
    ys = [c[1] for c in corners]
    return [min(xs), min(ys), max(xs), max(ys)]


def box_area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def translation(dx: float, dy: float) -> Matrix3:
    return [[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]]


def scaling(sx: float, sy: float) -> Matrix3:
    return [[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]]
