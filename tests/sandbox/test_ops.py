"""The op vocabulary: geometry of each op (hand-checked corners), canonical decompositions, sanitizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cv_ray.geometry import apply, compose, translation
from cv_ray.sandbox import ops
from cv_ray.types import CORE_OPS


def _close(a, b, tol=1e-9):
    return all(abs(x - y) <= tol for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_vocabulary_is_split_into_core_and_non_core():
    assert CORE_OPS == {"rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical", "crop"}
    assert not CORE_OPS & ops.NON_CORE_OPS
    assert ops.KNOWN_OPS == CORE_OPS | ops.NON_CORE_OPS
    assert ops.GEOMETRY_LOST_OPS <= ops.GEOMETRIC_OPS <= ops.KNOWN_OPS


# -- hand-checked corners of each orientation op on a 4 x 3 image (W=4, H=3) --------------------
# rotate_90 (ccw): output is 3 x 4; its top-left corner shows the input's top-right corner, so
#   output (0, 0) -> input (4, 0), output (3, 0) -> input (4, 3), output (0, 4) -> input (0, 0).
# rotate_270 (cw): output top-left shows the input's bottom-left: (0, 0) -> (0, 3); (3, 4) -> (4, 0).
# rotate_180: (0, 0) -> (4, 3). flip_horizontal: (0, 0) -> (4, 0). flip_vertical: (0, 0) -> (0, 3).
@pytest.mark.parametrize("name,out_size,corners", [
    ("rotate_90", (3, 4), {(0, 0): (4, 0), (3, 0): (4, 3), (0, 4): (0, 0), (3, 4): (0, 3)}),
    ("rotate_270", (3, 4), {(0, 0): (0, 3), (3, 0): (0, 0), (0, 4): (4, 3), (3, 4): (4, 0)}),
    ("rotate_180", (4, 3), {(0, 0): (4, 3), (4, 3): (0, 0), (4, 0): (0, 3)}),
    ("flip_horizontal", (4, 3), {(0, 0): (4, 0), (4, 3): (0, 3)}),
    ("flip_vertical", (4, 3), {(0, 0): (0, 3), (4, 3): (4, 0)}),
])
def test_orientation_geometry_maps_hand_checked_corners(name, out_size, corners):
    matrix, size = ops.op_geometry({"op": name}, 4, 3)
    assert size == out_size
    for out_point, in_point in corners.items():
        assert apply(matrix, *out_point) == pytest.approx(in_point)


_PIL_METHODS = {
    Image.Transpose.ROTATE_90: ("rotate_90",), Image.Transpose.ROTATE_180: ("rotate_180",),
    Image.Transpose.ROTATE_270: ("rotate_270",), Image.Transpose.FLIP_LEFT_RIGHT: ("flip_horizontal",),
    Image.Transpose.FLIP_TOP_BOTTOM: ("flip_vertical",),
    Image.Transpose.TRANSPOSE: ("flip_horizontal", "rotate_90"),
    Image.Transpose.TRANSVERSE: ("flip_horizontal", "rotate_270"),
}


@pytest.mark.parametrize("method", list(_PIL_METHODS))
def test_canonical_sequences_reproduce_every_pil_transpose_pixel_for_pixel(method):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = np.asarray(image.transpose(method))
    matrix, size = ops.chain_geometry([{"op": n} for n in _PIL_METHODS[method]], 7, 5)
    assert size == (out.shape[1], out.shape[0])
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            src_x, src_y = apply(matrix, x + 0.5, y + 0.5)
            assert (out[y, x] == pixels[math.floor(src_y), math.floor(src_x)]).all()
    # and the decomposition of that element is exactly the documented canonical sequence
    linear = ops.split_axis_aligned(matrix)[0]
    assert ops.dihedral_ops(linear) == list(_PIL_METHODS[method])


def test_the_eight_canonical_sequences_are_distinct_and_closed_under_composition():
    linears = [ops.sequence_linear(seq) for seq in ops.DIHEDRAL_SEQUENCES]
    assert len(set(linears)) == 8
    for seq_a in ops.DIHEDRAL_SEQUENCES:
        for seq_b in ops.DIHEDRAL_SEQUENCES:
            combined = ops.sequence_linear(seq_a + seq_b)
            assert combined in linears
    # rotate_90 twice is rotate_180; flip twice is the identity
    assert ops.dihedral_ops(ops.sequence_linear(("rotate_90", "rotate_90"))) == ["rotate_180"]
    assert ops.dihedral_ops(ops.sequence_linear(("flip_vertical", "flip_vertical"))) == []
    # a vertical flip equals a horizontal flip followed by a half turn
    assert ops.dihedral_ops(ops.sequence_linear(("flip_horizontal", "rotate_180"))) == ["flip_vertical"]


def test_crop_and_resize_geometry():
    # crop [10, 20, 50, 60]: output (0, 0) is input (10, 20); output (40, 40) is input (50, 60)
    matrix, size = ops.op_geometry({"op": "crop", "box": [10, 20, 50, 60]}, 100, 80)
    assert size == (40, 40)
    assert apply(matrix, 0, 0) == (10, 20) and apply(matrix, 40, 40) == (50, 60)
    # resize 100 x 80 -> 50 x 160: x halves, y doubles, so output (50, 160) is input (100, 80)
    matrix, size = ops.op_geometry({"op": "resize", "size": [50, 160]}, 100, 80)
    assert size == (50, 160) and apply(matrix, 50, 160) == pytest.approx((100, 80))
    # resize with a source box (PIL's resize(box=...)): output (0, 0) is the box's corner, and
    # output (20, 20) its far corner [10 + 40, 20 + 20]
    matrix, size = ops.op_geometry({"op": "resize", "size": [20, 20], "box": [10, 20, 50, 40]}, 100, 80)
    assert apply(matrix, 0, 0) == (10, 20) and apply(matrix, 20, 20) == pytest.approx((50, 40))
    # photometric ops keep every pixel in place; lost-geometry ops give None
    assert ops.op_geometry({"op": "contrast_up"}, 100, 80) == ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], (100, 80))
    assert ops.op_geometry({"op": "rotate_arbitrary", "angle": 30}, 100, 80) is None
    assert ops.op_geometry({"op": "crop"}, 100, 80) is None


def test_rotate_90_without_expand_keeps_the_canvas_and_the_centre():
    # PIL's rotate(90) on a 6 x 4 image keeps 6 x 4: the centre (3, 2) stays the centre, and the
    # output's centre row maps onto the input's centre column.
    matrix, size = ops.op_geometry({"op": "rotate_90", "expand": False}, 6, 4)
    assert size == (6, 4)
    assert apply(matrix, 3, 2) == pytest.approx((3, 2))
    # a counter-clockwise turn brings what was below the centre to its right, so one pixel right
    # of the centre in the output reads one pixel below it in the input: (4, 2) -> (3, 3)
    assert apply(matrix, 4, 2) == pytest.approx((3, 3))


def test_chain_composition_order_is_first_op_first():
    # crop [10, 0, 30, 20] of a 40 x 20 image, then rotate_90 of the 20 x 20 crop: the result's
    # top-left corner shows the crop's top-right corner, i.e. input (30, 0).
    matrix, size = ops.chain_geometry([{"op": "crop", "box": [10, 0, 30, 20]}, {"op": "rotate_90"}], 40, 20)
    assert size == (20, 20)
    assert apply(matrix, 0, 0) == (30, 0)
    assert _close(matrix, compose(translation(10, 0), ops.op_geometry({"op": "rotate_90"}, 20, 20)[0]))


@pytest.mark.parametrize("seq", ops.DIHEDRAL_SEQUENCES)
@pytest.mark.parametrize("box", [None, [3, 2, 9, 7]])
def test_canonical_ops_round_trip(seq, box):
    chain = ([{"op": "crop", "box": box}] if box else []) + [{"op": n} for n in seq]
    matrix, (w, h) = ops.chain_geometry(chain, 12, 8)
    canonical = ops.canonical_ops(matrix, w, h, 12, 8)
    assert [op["op"] for op in canonical] == [op["op"] for op in chain]
    if box:
        assert canonical[0]["box"] == box
    assert _close(ops.chain_geometry(canonical, 12, 8)[0], matrix)


def test_canonical_ops_of_a_zoom_and_of_non_axis_aligned_maps():
    # a 4x zoom of the box [8, 4, 18, 14]: crop then resize to 40 x 40
    matrix = [[0.25, 0.0, 8.0], [0.0, 0.25, 4.0], [0.0, 0.0, 1.0]]
    assert ops.canonical_ops(matrix, 40, 40, 100, 100) == [
        {"op": "crop", "box": [8, 4, 18, 14]}, {"op": "resize", "size": [40, 40]}]
    cos, sin = math.cos(0.3), math.sin(0.3)
    assert ops.canonical_ops([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], 10, 10, 10, 10) is None
    assert ops.split_axis_aligned([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]) is None


# -- sanitizing untrusted hints -----------------------------------------------------------------


def test_sanitize_keeps_well_formed_ops_and_drops_the_rest():
    raw = [
        {"op": "rotate_90", "via": "cv2.rotate", "src": 0, "dst": 1, "changed": True},
        {"op": "crop", "box": [1, 2, 30, 40], "input_box": [1.5, 2, 30, 40], "src": 1, "dst": 2},
        {"op": "contrast_up", "factor": 1.5, "changed": True, "secret": "x" * 10_000},
        {"op": "blur"},
        {"op": "rm -rf /"},
        {"op": 90},
        "rotate_90",
        None,
        {"no_op": True},
    ]
    assert ops.sanitize_ops(raw) == [
        {"op": "rotate_90", "via": "cv2.rotate", "src": 0, "dst": 1},          # core: no `changed`
        {"op": "crop", "box": [1, 2, 30, 40], "input_box": [1.5, 2, 30, 40], "src": 1, "dst": 2},
        {"op": "contrast_up", "factor": 1.5, "changed": True},                 # unknown key dropped
        {"op": "blur", "changed": False},                                      # unclaimed: no credit
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300, True, "1.5", [1.5], None])
def test_sanitize_drops_non_finite_absurd_and_mistyped_numbers(bad):
    clean = ops.sanitize_ops([{"op": "contrast_up", "factor": bad, "changed": True},
                              {"op": "crop", "box": [0, 0, bad, 10]},
                              {"op": "resize", "size": [bad, 10], "changed": "yes"}])
    assert clean == [{"op": "contrast_up", "changed": True}, {"op": "crop"}, {"op": "resize", "changed": False}]


def test_sanitize_rejects_bad_boxes_sizes_ids_and_identifiers():
    clean = ops.sanitize_ops([
        {"op": "crop", "box": [10, 10, 5, 20]},            # x2 <= x1: empty
        {"op": "crop", "box": [0, 0, 1]},                  # three numbers
        {"op": "resize", "size": [0, 5]},                  # zero side
        {"op": "resize", "size": [2.5, 5]},                # fractional side
        {"op": "rotate_90", "src": -1, "dst": 10**9},      # ids out of range
        {"op": "blur", "via": "cv2.blur; import os"},      # not an identifier
        {"op": "blur", "via": "a" * 100},                  # too long
    ])
    assert clean == [{"op": "crop"}, {"op": "crop"}, {"op": "resize", "changed": False},
                     {"op": "resize", "changed": False}, {"op": "rotate_90"},
                     {"op": "blur", "changed": False}, {"op": "blur", "changed": False}]


@pytest.mark.parametrize("raw", [None, "rotate_90", 42, {"op": "rotate_90"}, b"\x00", float("nan")])
def test_sanitize_of_a_non_list_is_empty(raw):
    assert ops.sanitize_ops(raw) == []


def test_sanitize_bounds_huge_lists():
    raw = [{"op": "rotate_90"}] * 1_000_000
    assert len(ops.sanitize_ops(raw)) == ops.MAX_HINT_OPS
