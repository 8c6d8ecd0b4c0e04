"""The op vocabulary of the sandbox, the geometry of each geometric op, and hint sanitizing.

An op is a dict ``{"op": name, **params}``. The names are the reward's vocabulary:

* core ops (``cv_ray.types.CORE_OPS``): ``rotate_90``, ``rotate_180``, ``rotate_270`` (counter-
  clockwise, PIL's convention; ``cv2.ROTATE_90_CLOCKWISE`` is ``rotate_270``), ``flip_horizontal``
  (left-right mirror), ``flip_vertical`` (top-bottom) and ``crop`` (``box`` = ``[x1, y1, x2, y2]``);
* non-core ops (``NON_CORE_OPS``): photometric edits, resizes, padding, free rotations, drawing.
  They carry ``"changed": bool`` -- whether the op's output differed from its input -- because the
  reward pays its "emerging tool" bonus only for ops that changed the image.

Geometry follows ``cv_ray/geometry.py``: continuous pixel coordinates, boxes with exclusive ends,
3x3 matrices on column vectors. ``op_geometry`` gives, for one op applied to a ``W x H`` image, the
matrix mapping the op's *output* pixels to its *input* pixels (the ``to_input`` direction) and the
output size. Chains compose as ``to_input(chain) = M_1 @ M_2 @ ... @ M_n``.

Canonical decomposition of the eight 90-degree turns and flips (``DIHEDRAL_SEQUENCES``), in the
order the ops are applied; the two diagonal reflections are a horizontal flip followed by a turn:

=====================  ===========================================  =====================
element                ops emitted                                  PIL ``Transpose``
=====================  ===========================================  =====================
identity               ``[]``                                       --
turn 90 ccw            ``[rotate_90]``                              ``ROTATE_90``
turn 180               ``[rotate_180]``                             ``ROTATE_180``
turn 90 cw             ``[rotate_270]``                             ``ROTATE_270``
mirror left-right      ``[flip_horizontal]``                        ``FLIP_LEFT_RIGHT``
mirror top-bottom      ``[flip_vertical]``                          ``FLIP_TOP_BOTTOM``
main-diagonal reflect  ``[flip_horizontal, rotate_90]``             ``TRANSPOSE``
anti-diagonal reflect  ``[flip_horizontal, rotate_270]``            ``TRANSVERSE``
=====================  ===========================================  =====================

A geometric view of an image (any crop, turn, flip and axis-aligned resize) is emitted as
``[crop(box in the source frame)] + dihedral ops + [resize]`` (``canonical_ops``), each part only
when it is not the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from cv_ray.geometry import compose, identity, map_box, scaling, translation
from cv_ray.types import CORE_OPS, ORIENTATION_OPS, Matrix3

#: Ops that are not core: photometric edits and geometric ops the reward does not ask for.
NON_CORE_OPS: frozenset[str] = frozenset({
    "contrast_up", "contrast_down", "brightness_up", "brightness_down",
    "sharpness_up", "sharpness_down", "saturation_up", "saturation_down",
    "blur", "denoise", "sharpen", "edge_detection", "grayscale", "invert", "autocontrast", "equalize",
    "posterize", "solarize", "threshold", "morphology", "convolve", "lut", "color_convert",
    "blend", "draw", "resize", "pad", "rotate_arbitrary", "affine", "perspective",
})
KNOWN_OPS: frozenset[str] = CORE_OPS | NON_CORE_OPS

#: After these ops the output is no longer an axis-aligned view of the input (fill corners, shear).
GEOMETRY_LOST_OPS: frozenset[str] = frozenset({"rotate_arbitrary", "affine", "perspective"})
#: Ops that move pixels (the rest keep every pixel where it was).
GEOMETRIC_OPS: frozenset[str] = ORIENTATION_OPS | {"crop", "resize", "pad"} | GEOMETRY_LOST_OPS

#: Untrusted hint lists are cut to this many entries before anything else looks at them.
MAX_HINT_OPS = 64
#: Coordinates and sizes beyond this are absurd for any image the sandbox accepts.
MAX_COORD = 1.0e6
#: Node ids (``src``/``dst``) a tracer can hand out in one call.
MAX_NODE_ID = 100_000

Linear = tuple[tuple[int, int], tuple[int, int]]
"""The 2x2 linear part of an out->in dihedral map: a signed permutation matrix."""

# -- dihedral geometry ---------------------------------------------------------------------------

#: out->in linear part of each orientation op (x to the right, y down, rotations ccw on screen).
#: rotate_90 (ccw): input pixel (x, y) lands at (y, W-1-x), so output (x', y') reads input
#: (W - y', x') in continuous coordinates -> linear [[0, -1], [1, 0]], offset (W, 0).
_ORIENTATION_LINEAR: dict[str, Linear] = {
    "rotate_90": ((0, -1), (1, 0)),
    "rotate_180": ((-1, 0), (0, -1)),
    "rotate_270": ((0, 1), (-1, 0)),
    "flip_horizontal": ((-1, 0), (0, 1)),
    "flip_vertical": ((1, 0), (0, -1)),
}

#: The canonical op sequence of each of the eight dihedral elements, simplest first. The order
#: is also the preference order when a symmetric image matches several of them.
DIHEDRAL_SEQUENCES: tuple[tuple[str, ...], ...] = (
    (), ("rotate_90",), ("rotate_180",), ("rotate_270",), ("flip_horizontal",), ("flip_vertical",),
    ("flip_horizontal", "rotate_90"), ("flip_horizontal", "rotate_270"),
)

IDENTITY_LINEAR: Linear = ((1, 0), (0, 1))


def _mul(a: Linear, b: Linear) -> Linear:
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(2)) for j in range(2)) for i in range(2))  # type: ignore[return-value]


def sequence_linear(ops: Sequence[str]) -> Linear:
    """The out->in linear part of applying the orientation ops in order (first op first).

    Applying A then B maps B's output to A's input through ``L_A @ L_B``.
    """
    linear = IDENTITY_LINEAR
    for name in ops:
        linear = _mul(linear, _ORIENTATION_LINEAR[name])
    return linear


_SEQUENCE_OF_LINEAR: dict[Linear, tuple[str, ...]] = {sequence_linear(seq): seq for seq in DIHEDRAL_SEQUENCES}
assert len(_SEQUENCE_OF_LINEAR) == 8, "the canonical sequences must cover the 8 dihedral elements"


def dihedral_ops(linear: Linear) -> list[str]:
    """The canonical op names of one dihedral element, given its out->in linear part."""
    return list(_SEQUENCE_OF_LINEAR[linear])


def swaps_axes(linear: Linear) -> bool:
    return linear[0][0] == 0


def dihedral_matrix(linear: Linear, out_w: float, out_h: float) -> Matrix3:
    """The out->in matrix of a dihedral element whose *output* is ``out_w x out_h``.

    The offset is whatever brings the output rectangle back onto ``[0, W] x [0, H]``: the minimum
    of the linear part over the output's corners, negated.
    """
    (a, b), (c, d) = linear
    xs = [a * x + b * y for x, y in ((0, 0), (out_w, 0), (0, out_h), (out_w, out_h))]
    ys = [c * x + d * y for x, y in ((0, 0), (out_w, 0), (0, out_h), (out_w, out_h))]
    return [[float(a), float(b), -min(xs)], [float(c), float(d), -min(ys)], [0.0, 0.0, 1.0]]


def orientation_output_size(name: str, src_w: int, src_h: int) -> tuple[int, int]:
    return (src_h, src_w) if swaps_axes(_ORIENTATION_LINEAR[name]) else (src_w, src_h)


# -- per-op geometry (a registry: op name -> function of the op's params and the input size) ----

Geometry = tuple[Matrix3, tuple[int, int]]
GeometryFn = Callable[[dict[str, Any], int, int], "Geometry | None"]


def _orientation_geometry(name: str) -> GeometryFn:
    def geometry(op: dict[str, Any], src_w: int, src_h: int) -> Geometry:
        out_w, out_h = orientation_output_size(name, src_w, src_h)
        matrix = dihedral_matrix(_ORIENTATION_LINEAR[name], out_w, out_h)
        if op.get("expand") is False and (out_w, out_h) != (src_w, src_h):
            # PIL's rotate(90) without expand keeps the canvas and the centre: the W x H output
            # sits centred on the H x W expanded result.
            matrix = compose(matrix, translation((out_w - src_w) / 2, (out_h - src_h) / 2))
            out_w, out_h = src_w, src_h
        return matrix, (out_w, out_h)

    return geometry


def _box_geometry(op: dict[str, Any], src_w: int, src_h: int) -> Geometry | None:
    box = op.get("box")
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return translation(x1, y1), (max(0, round(x2 - x1)), max(0, round(y2 - y1)))


def _resize_geometry(op: dict[str, Any], src_w: int, src_h: int) -> Geometry | None:
    size = op.get("size")
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    x1, y1, x2, y2 = op.get("box") or (0, 0, src_w, src_h)
    out_w, out_h = size
    return compose(translation(x1, y1), scaling((x2 - x1) / out_w, (y2 - y1) / out_h)), (out_w, out_h)


_GEOMETRY: dict[str, GeometryFn] = {
    **{name: _orientation_geometry(name) for name in _ORIENTATION_LINEAR},
    "crop": _box_geometry,
    "pad": _box_geometry,
    "resize": _resize_geometry,
}


def op_geometry(op: dict[str, Any], src_w: int, src_h: int) -> Geometry | None:
    """``(out->in matrix, (out_w, out_h))`` of one op applied to a ``src_w x src_h`` image.

    Ops that keep every pixel in place (photometric ones) give the identity and the same size.
    Returns None when the op destroys the axis-aligned relation (free rotation, affine, perspective)
    or lacks the parameters that define its geometry (a crop without a box).
    """
    if op["op"] in GEOMETRY_LOST_OPS:
        return None
    fn = _GEOMETRY.get(op["op"])
    if fn is None:
        return identity(), (src_w, src_h)
    return fn(op, src_w, src_h)


def chain_geometry(ops: Sequence[dict[str, Any]], src_w: int, src_h: int) -> Geometry | None:
    """The out->in matrix and output size of a whole chain of ops (None once geometry is lost)."""
    matrix, size = identity(), (src_w, src_h)
    for op in ops:
        step = op_geometry(op, *size)
        if step is None:
            return None
        matrix, size = compose(matrix, step[0]), step[1]
    return matrix, size


# -- decomposing a view back into ops ----------------------------------------------------------


def split_axis_aligned(matrix: Matrix3, tol: float = 1e-6) -> tuple[Linear, float, float] | None:
    """Write the linear part of ``matrix`` as ``L @ diag(sx, sy)`` with ``L`` dihedral, s > 0.

    Column j of the linear part is where output axis j goes; it must have one non-zero entry,
    in a different row from the other column's. Returns None for shears and free rotations.
    """
    columns = [(matrix[0][0], matrix[1][0]), (matrix[0][1], matrix[1][1])]
    signs: list[tuple[int, int]] = []
    scales: list[float] = []
    for cx, cy in columns:
        if abs(cy) <= tol and abs(cx) > tol:
            signs.append((1 if cx > 0 else -1, 0))
            scales.append(abs(cx))
        elif abs(cx) <= tol and abs(cy) > tol:
            signs.append((0, 1 if cy > 0 else -1))
            scales.append(abs(cy))
        else:
            return None
    if (signs[0][0] == 0) == (signs[1][0] == 0):
        return None
    linear: Linear = ((signs[0][0], signs[1][0]), (signs[0][1], signs[1][1]))
    return linear, scales[0], scales[1]


def canonical_ops(matrix: Matrix3, out_w: int, out_h: int, src_w: int, src_h: int,
                  tol: float = 1e-6) -> list[dict[str, Any]] | None:
    """Ops that turn a ``src_w x src_h`` image into the ``out_w x out_h`` view ``matrix`` describes.

    ``[crop(box)]`` when the covered source region is not the whole source, then the dihedral
    element's canonical ops, then ``[resize]`` when the region is scaled. None when ``matrix`` is
    not axis-aligned.
    """
    split = split_axis_aligned(matrix, tol)
    if split is None:
        return None
    linear, sx, sy = split
    box = map_box(matrix, [0, 0, out_w, out_h])
    ops: list[dict[str, Any]] = []
    if any(abs(a - b) > tol for a, b in zip(box, (0, 0, src_w, src_h))):
        ops.append({"op": "crop", "box": [_tidy(v) for v in box]})
    ops.extend({"op": name} for name in dihedral_ops(linear))
    if abs(sx - 1) > tol or abs(sy - 1) > tol:
        ops.append({"op": "resize", "size": [int(out_w), int(out_h)]})
    return ops


def _tidy(value: float) -> float | int:
    """Integers stay integers in reports (boxes from pixel views are whole numbers)."""
    rounded = round(value)
    return int(rounded) if abs(value - rounded) < 1e-9 else float(value)


# -- sanitizing untrusted hints ----------------------------------------------------------------


def _number(value: Any, low: float = -MAX_COORD, high: float = MAX_COORD) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def _integer(value: Any, low: int, high: int) -> int | None:
    number = _number(value, low, high)
    return int(number) if number is not None and number == int(number) else None


def _box(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    numbers = [_number(v) for v in value]
    if any(v is None for v in numbers) or numbers[2] <= numbers[0] or numbers[3] <= numbers[1]:  # type: ignore[operator]
        return None
    return [_tidy(v) for v in numbers]  # type: ignore[arg-type]


def _size(value: Any) -> list[int] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    sides = [_integer(v, 1, int(MAX_COORD)) for v in value]
    return None if None in sides else sides  # type: ignore[return-value]


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _ident(value: Any) -> str | None:
    """Short dotted identifiers only (``cv2.GaussianBlur``): nothing the child can smuggle through."""
    if isinstance(value, str) and 0 < len(value) <= 48 and all(c.isalnum() or c in "._" for c in value):
        return value
    return None


_PARAMS: dict[str, Callable[[Any], Any]] = {
    "box": _box,
    "input_box": _box,
    "frame_box": _box,
    "size": _size,
    "factor": lambda v: _number(v, -1e4, 1e4),
    "angle": lambda v: _number(v, -1e6, 1e6),
    "threshold": lambda v: _number(v, -1e6, 1e6),
    "radius": lambda v: _number(v, 0, 1e4),
    "bits": lambda v: _integer(v, 0, 32),
    "count": lambda v: _integer(v, 1, 1_000_000),
    "expand": _flag,
    "changed": _flag,
    "via": _ident,
    "src": lambda v: _integer(v, 0, MAX_NODE_ID),
    "dst": lambda v: _integer(v, 0, MAX_NODE_ID),
}


def sanitize_ops(raw: Any) -> list[dict[str, Any]]:
    """Known op names with well-formed params only, from an untrusted list of op dicts.

    The list is cut to ``MAX_HINT_OPS`` entries first; entries that are not dicts with a known
    ``op`` name are dropped; within an entry, unknown keys and malformed values (non-finite or
    absurd numbers, wrong types, empty boxes) are dropped. Non-core ops keep ``changed`` only
    when it is a bool, and default to ``False``: an op that does not say it changed the image
    earns nothing.
    """
    if not isinstance(raw, (list, tuple)):
        return []
    clean: list[dict[str, Any]] = []
    for entry in raw[:MAX_HINT_OPS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("op"), str) or entry["op"] not in KNOWN_OPS:
            continue
        op: dict[str, Any] = {"op": entry["op"]}
        for key, check in _PARAMS.items():
            if key in entry:
                value = check(entry[key])
                if value is not None:
                    op[key] = value
        if op["op"] in CORE_OPS:
            op.pop("changed", None)
        else:
            op.setdefault("changed", False)
        clean.append(op)
    return clean
