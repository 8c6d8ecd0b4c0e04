"""Parent-side reconciliation: traced hints verified against pixels, and ops recognised without hints.

End-to-end in one process: the tracer runs model-style code (as the sandbox child would), its ops
cross a JSON round trip, and ``reconcile`` judges them against the input and result images.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from skimage import data

from cv_ray.geometry import apply
from cv_ray.sandbox.recognize import reconcile
from cv_ray.sandbox.tracing import OpTracer

PHOTO = Image.fromarray(data.astronaut()).resize((160, 120))   # non-square: turns change the size
SQUARE = Image.fromarray(data.astronaut()).resize((96, 96))
QUARTER_TURN = [[0.0, -1.0, 160.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # rotate_90 of 160 x 120


def _text_image() -> Image.Image:
    image = Image.new("RGB", (240, 120), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for row, line in enumerate(["INVOICE 2024-117", "Total due: $1,284.50", "Pay by 12 March", "Ref QX-88"]):
        draw.text((8, 6 + row * 28), line, fill="black", font=font)
    return image


TEXT = _text_image()


@pytest.fixture(scope="module")
def tracer():
    tracer = OpTracer()
    tracer.install()
    yield tracer
    tracer.uninstall()


def execute(tracer: OpTracer, code: str, image: Image.Image = PHOTO):
    """Run code as the sandbox child does; return (result image, JSON-round-tripped hints)."""
    image = image.copy()
    namespace = {"image": image, "img": image, "draw": ImageDraw.Draw(image), "Image": Image,
                 "ImageOps": ImageOps, "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter,
                 "np": np, "cv2": cv2, "math": math}
    tracer.begin(image)
    exec(code, namespace)  # noqa: S102 -- running model-style code is the point of these tests
    result = namespace["result"]
    hints = json.loads(json.dumps(tracer.ops(result=result)))
    tracer.end()
    if not isinstance(result, Image.Image):
        result = Image.fromarray(np.ascontiguousarray(result))
    return result, hints


def assert_exact_view(input_image: Image.Image, result: Image.Image, to_input) -> None:
    """Every result pixel equals the input pixel its centre maps to (an independent check)."""
    src, out = np.asarray(input_image), np.asarray(result)
    h, w = out.shape[:2]
    for y in range(0, h, max(1, h // 23)):
        for x in range(0, w, max(1, w // 23)):
            sx, sy = apply(to_input, x + 0.5, y + 0.5)
            assert (out[y, x] == src[math.floor(sy), math.floor(sx)]).all(), (x, y)


def core(ops):
    return [op["op"] for op in ops if op["op"] in
            ("rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical", "crop")]


# -- the brief's four spellings of a quarter turn, and the numpy crop ------------------------------

@pytest.mark.parametrize("code", [
    "result = image.rotate(90, expand=True)",
    "result = Image.fromarray(np.rot90(np.array(img)))",
    "result = cv2.rotate(np.array(img), cv2.ROTATE_90_COUNTERCLOCKWISE)",
    "result = img.transpose(Image.ROTATE_90)",
    "result = np.ascontiguousarray(np.rot90(np.array(img))).copy()",   # lineage lost: pixels only
])
def test_every_quarter_turn_is_rotate_90_with_or_without_hints(tracer, code):
    result, hints = execute(tracer, code)
    for given in (hints, []):
        ops, to_input = reconcile(PHOTO, result, given)
        assert core(ops) == ["rotate_90"]
        assert to_input == QUARTER_TURN
    assert_exact_view(PHOTO, result, to_input)


@pytest.mark.parametrize("code", [
    "result = np.array(img)[20:70, 30:90]",
    "result = np.array(img)[20:70, 30:90].copy()",
    "a = np.asarray(image); result = Image.fromarray(a[20:70, 30:90])",
    "result = img.crop((30, 20, 90, 70))",
])
def test_numpy_and_pil_crops_give_the_box_with_or_without_hints(tracer, code):
    result, hints = execute(tracer, code)
    for given in (hints, []):
        ops, to_input = reconcile(PHOTO, result, given)
        assert ops[0]["op"] == "crop" and ops[0]["box"] == [30, 20, 90, 70]
        assert to_input == [[1.0, 0.0, 30.0], [0.0, 1.0, 20.0], [0.0, 0.0, 1.0]]


# -- compositions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("code,expected", [
    ("result = img.rotate(180)", ["rotate_180"]),
    ("result = img.rotate(270, expand=True)", ["rotate_270"]),
    ("result = cv2.rotate(np.array(img), cv2.ROTATE_90_CLOCKWISE)", ["rotate_270"]),
    ("result = ImageOps.mirror(image)", ["flip_horizontal"]),
    ("result = np.flipud(np.array(image))", ["flip_vertical"]),
    ("result = img.transpose(Image.TRANSPOSE)", ["flip_horizontal", "rotate_90"]),
    ("result = cv2.transpose(np.array(img))", ["flip_horizontal", "rotate_90"]),
    ("result = ImageOps.mirror(image).rotate(90, expand=True)", ["flip_horizontal", "rotate_90"]),
    ("result = image.rotate(90, expand=True).rotate(90, expand=True)", ["rotate_90", "rotate_90"]),
])
def test_turns_and_flips_with_hints_keep_the_traced_ops(tracer, code, expected):
    result, hints = execute(tracer, code)
    ops, to_input = reconcile(PHOTO, result, hints)
    assert core(ops) == expected
    assert_exact_view(PHOTO, result, to_input)


@pytest.mark.parametrize("code,canonical", [
    ("result = img.rotate(90, expand=True).rotate(90, expand=True)", ["rotate_180"]),
    ("result = ImageOps.flip(ImageOps.mirror(image))", ["rotate_180"]),
    ("result = np.array(img).transpose(1, 0, 2)[:, ::-1].copy()", ["rotate_270"]),
    ("result = img.transpose(Image.TRANSVERSE)", ["flip_horizontal", "rotate_270"]),
])
def test_without_hints_the_canonical_decomposition_is_reported(tracer, code, canonical):
    result, _ = execute(tracer, code)
    ops, to_input = reconcile(PHOTO, result, [])
    assert core(ops) == canonical and all(op["via"] == "pixels" for op in ops)
    assert_exact_view(PHOTO, result, to_input)


def test_crop_of_a_rotated_view_without_hints(tracer):
    # np.rot90(a)[10:60, 20:100]: rotated rows 10..60 are input columns 160-60..160-10 = 100..150,
    # rotated columns 20..100 are input rows 20..100 -> crop [100, 20, 150, 100], then rotate_90.
    result, hints = execute(tracer, "result = np.rot90(np.array(img))[10:60, 20:100].copy()")
    assert hints == []
    ops, to_input = reconcile(PHOTO, result, [])
    assert ops == [{"op": "crop", "box": [100, 20, 150, 100], "frame_box": [100, 20, 150, 100], "via": "pixels"}, {"op": "rotate_90", "via": "pixels"}]
    assert apply(to_input, 0, 0) == (150, 20)   # result's top-left shows the box's top-right
    assert_exact_view(PHOTO, result, to_input)


def test_pil_crop_of_a_rotated_image_reports_the_input_frame_box(tracer):
    # as derived in test_tracing: crop [10, 20, 60, 70] of the rotated image is input [90, 10, 140, 60]
    result, hints = execute(tracer, "result = image.rotate(90, expand=True).crop((10, 20, 60, 70))")
    ops, to_input = reconcile(PHOTO, result, hints)
    assert core(ops) == ["rotate_90", "crop"]
    assert ops[1]["box"] == [90.0, 10.0, 140.0, 60.0]
    assert_exact_view(PHOTO, result, to_input)


def test_small_crop_of_a_text_image_is_found_without_hints(tracer):
    # a 30 x 14 patch of a mostly white document: the rare dark pixels locate it
    result, _ = execute(tracer, "result = np.array(image)[34:48, 60:90].copy()", image=TEXT)
    ops, to_input = reconcile(TEXT, result, [])
    assert ops == [{"op": "crop", "box": [60, 34, 90, 48], "frame_box": [60, 34, 90, 48], "via": "pixels"}]
    assert_exact_view(TEXT, result, to_input)


def test_zoomed_crop_is_verified_through_its_hints_only(tracer):
    # the box [60, 40, 100, 70] zoomed 4x: to_input scales by 1/4 and starts at the box corner
    for code in ("result = img.crop((60, 40, 100, 70)).resize((160, 120))",
                 "result = cv2.resize(np.array(img)[40:70, 60:100], None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)"):
        result, hints = execute(tracer, code)
        ops, to_input = reconcile(PHOTO, result, hints)
        assert [op["op"] for op in ops] == ["crop", "resize"]
        assert ops[0]["box"] == [60, 40, 100, 70]
        assert to_input == [[0.25, 0.0, 60.0], [0.0, 0.25, 40.0], [0.0, 0.0, 1.0]]
        # no hints: an interpolated zoom is not searched for, so nothing geometric is claimed
        ops, to_input = reconcile(PHOTO, result, [])
        assert ops == [] and to_input is None


# -- photometric ops after geometry ----------------------------------------------------------------

@pytest.mark.parametrize("code,expected_op", [
    ("result = ImageEnhance.Contrast(image.rotate(90, expand=True)).enhance(1.6)", "contrast_up"),
    ("result = ImageEnhance.Brightness(image.rotate(90, expand=True)).enhance(0.5)", "brightness_down"),
    ("result = image.rotate(90, expand=True).filter(ImageFilter.GaussianBlur(1.5))", "blur"),
    ("result = ImageOps.invert(image.rotate(90, expand=True))", "invert"),
    ("result = cv2.Canny(cv2.rotate(np.array(img), cv2.ROTATE_90_COUNTERCLOCKWISE), 60, 160)", "edge_detection"),
])
def test_photometric_after_a_turn_keeps_the_verified_geometry(tracer, code, expected_op):
    result, hints = execute(tracer, code)
    ops, to_input = reconcile(PHOTO, result, hints)
    assert core(ops) == ["rotate_90"]
    assert ops[-1]["op"] == expected_op and ops[-1]["changed"] is True
    assert to_input == QUARTER_TURN


def test_unchanged_enhance_is_reported_unchanged_even_if_the_hint_says_otherwise(tracer):
    result, hints = execute(tracer, "result = ImageEnhance.Contrast(image.rotate(90, expand=True)).enhance(1.0)")
    assert hints[-1]["changed"] is False
    forged = [dict(op, changed=True) if op["op"] == "contrast_up" else op for op in hints]
    for given in (hints, forged):
        ops, to_input = reconcile(PHOTO, result, given)
        assert ops[-1] == {"op": "contrast_up", "factor": 1.0, "changed": False, "via": "ImageEnhance.Contrast"}
        assert to_input == QUARTER_TURN


def test_a_small_edit_keeps_the_change_claim(tracer):
    # the sparse grid cannot see one pixel, but an unchanged verdict needs every pixel to agree
    result, hints = execute(tracer, "a = image.rotate(90, expand=True); a.putpixel((1, 1), (0, 0, 0)); result = a")
    ops, to_input = reconcile(PHOTO, result, hints)
    assert [op["op"] for op in ops] == ["rotate_90", "draw"] and ops[1]["changed"] is True
    assert to_input == QUARTER_TURN


def test_gray_and_channel_swapped_results_are_recognised(tracer):
    result, _ = execute(tracer, "result = img.convert('L').rotate(270, expand=True)")
    ops, to_input = reconcile(PHOTO, result, [])
    assert ops == [{"op": "rotate_270", "via": "pixels"}, {"op": "grayscale", "via": "pixels", "changed": True}]
    # OpenCV's gray rounds differently from PIL's: still an exact crop within the tolerance
    result, _ = execute(tracer, "result = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2GRAY)[20:70, 30:90].copy()")
    ops, _ = reconcile(PHOTO, result, [])
    assert core(ops) == ["crop"] and ops[0]["box"] == [30, 20, 90, 70] and ops[-1]["op"] == "grayscale"
    # a forgotten BGR conversion
    result, hints = execute(tracer, "result = cv2.rotate(cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR), cv2.ROTATE_180)")
    for given in (hints, []):
        ops, to_input = reconcile(PHOTO, result, given)
        assert core(ops) == ["rotate_180"] and "color_convert" in [op["op"] for op in ops]
        assert to_input == [[-1.0, 0.0, 160.0], [0.0, -1.0, 120.0], [0.0, 0.0, 1.0]]


def test_untraced_numpy_arithmetic_after_a_turn_still_recovers_the_turn(tracer):
    code = ("a = np.array(img.rotate(90, expand=True)).astype(np.float32)\n"
            "result = np.clip(a * 1.4 - 30, 0, 255).astype(np.uint8)")
    result, hints = execute(tracer, code)
    ops, to_input = reconcile(PHOTO, result, hints)
    assert core(ops) == ["rotate_90"] and to_input == QUARTER_TURN


def test_turn_followed_by_unrecognisable_content_is_kept_but_unverified(tracer):
    # The code turned the image, then replaced every pixel: the turn's size still fits the result,
    # so the traced turn is reported, flagged as unverified, and no map is claimed.
    code = ("a = np.array(image.rotate(90, expand=True))\n"
            "result = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)")
    result, hints = execute(tracer, code)
    ops, to_input = reconcile(PHOTO, result, hints)
    assert ops == [{"op": "rotate_90", "angle": 90.0, "expand": True, "via": "Image.rotate", "unverified": True}]
    assert to_input is None
    assert reconcile(PHOTO, result, []) == ([], None)


def test_free_rotation_is_not_a_geometric_view(tracer):
    result, hints = execute(tracer, "result = image.rotate(30)")
    ops, to_input = reconcile(PHOTO, result, hints)
    assert ops == [{"op": "rotate_arbitrary", "angle": 30.0, "expand": False, "via": "Image.rotate", "changed": True}]
    assert to_input is None


# -- forged and malformed hints ------------------------------------------------------------------

def test_hints_the_pixels_contradict_are_rejected(tracer):
    result, _ = execute(tracer, "result = image.copy()")
    ops, to_input = reconcile(PHOTO, result, [{"op": "rotate_180", "src": 0, "dst": 1}])
    assert ops == [] and to_input == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    # a crop with a wrong box: the true box comes from the pixels
    result, _ = execute(tracer, "result = img.crop((30, 20, 90, 70))")
    ops, _ = reconcile(PHOTO, result, [{"op": "crop", "box": [0, 0, 60, 50], "src": 0, "dst": 1}])
    assert ops == [{"op": "crop", "box": [30, 20, 90, 70], "frame_box": [30, 20, 90, 70], "via": "pixels"}]
    # a turn claimed for a contrast change of the unturned square image: structure says identity
    result, _ = execute(tracer, "result = ImageEnhance.Contrast(image).enhance(1.7)", image=SQUARE)
    ops, to_input = reconcile(SQUARE, result, [{"op": "rotate_90", "src": 0, "dst": 1},
                                               {"op": "contrast_up", "changed": True, "src": 1, "dst": 2}])
    assert core(ops) == [] and to_input == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    # the wrong quarter turn claimed for a turned-and-brightened square image: the pixels show the other
    result, hints = execute(tracer, "result = ImageEnhance.Brightness(image.rotate(270)).enhance(0.6)", image=SQUARE)
    forged = [dict(op, op="rotate_90") if op["op"] == "rotate_270" else op for op in hints]
    ops, to_input = reconcile(SQUARE, result, forged)
    assert core(ops) == ["rotate_270"] and ops[0]["via"] == "pixels"
    assert to_input == [[0.0, 1.0, 0.0], [-1.0, 0.0, 96.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("garbage", [
    None, "rotate_90", 17, {"op": "crop"},
    [{"op": "crop", "box": [float("nan"), 0, 1e308, "x"]}, {"op": None}, [], "junk"],
    [{"op": "rotate_90", "src": 5, "dst": 5}, {"op": "flip_vertical", "src": 1, "dst": 0}],   # link cycles
    [{"op": "rotate_90", "src": 0, "dst": 1}] * 100_000,
    [{"op": "resize", "size": [10**9, 10**9], "src": 0, "dst": 1}],
])
def test_malformed_hints_fall_back_to_the_pixels(tracer, garbage):
    result, _ = execute(tracer, "result = np.rot90(np.array(img))[10:60, 20:100].copy()")
    ops, to_input = reconcile(PHOTO, result, garbage)
    assert core(ops) == ["crop", "rotate_90"] and ops[0]["box"] == [100, 20, 150, 100]
    assert_exact_view(PHOTO, result, to_input)


# -- symmetric images ----------------------------------------------------------------------------

def test_uniform_image_prefers_the_hint_else_the_identity(tracer):
    flat = Image.new("RGB", (64, 64), (120, 130, 140))
    result, hints = execute(tracer, "result = image.rotate(90, expand=True)", image=flat)
    ops, to_input = reconcile(flat, result, hints)
    assert core(ops) == ["rotate_90"]           # consistent with the pixels, so the hint wins
    ops, to_input = reconcile(flat, result, [])
    assert ops == [] and to_input == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_mirror_symmetric_image_keeps_a_consistent_flip_hint(tracer):
    half = np.asarray(SQUARE)[:, :48]
    symmetric = Image.fromarray(np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1)))
    result, hints = execute(tracer, "result = ImageOps.mirror(image)", image=symmetric)
    assert core(reconcile(symmetric, result, hints)[0]) == ["flip_horizontal"]
    assert core(reconcile(symmetric, result, [])[0]) == []   # the identity is the simplest match


def test_ambiguous_crop_placement_is_flagged(tracer):
    flat = Image.new("RGB", (64, 48), (10, 200, 30))
    result, _ = execute(tracer, "result = np.array(img)[10:20, 5:25].copy()", image=flat)
    ops, to_input = reconcile(flat, result, [])
    assert ops == [{"op": "crop", "box": [0, 0, 20, 10], "frame_box": [0, 0, 20, 10], "via": "pixels", "ambiguous": True}]
    assert to_input == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]   # the top-left placement
    # with the true hint, the traced box is kept
    result, hints = execute(tracer, "result = img.crop((5, 10, 25, 20))", image=flat)
    ops, _ = reconcile(flat, result, hints)
    assert ops == [{"op": "crop", "box": [5, 10, 25, 20], "frame_box": [5, 10, 25, 20], "via": "Image.crop"}]


def test_other_input_modes(tracer):
    gray = PHOTO.convert("L")
    result, _ = execute(tracer, "result = image.transpose(Image.ROTATE_270)", image=gray)
    assert core(reconcile(gray, result, [])[0]) == ["rotate_270"]
    rgba = PHOTO.convert("RGBA")
    result, _ = execute(tracer, "result = image.crop((5, 6, 50, 60))", image=rgba)
    ops, _ = reconcile(rgba, result, [])
    assert ops == [{"op": "crop", "box": [5, 6, 50, 60], "frame_box": [5, 6, 50, 60], "via": "pixels"}]


# -- verification with a budget and no crash (issue 18, classes 6-8) ------------------------------

def _crafted_pair(side: int) -> tuple[Image.Image, Image.Image]:
    """A pair that made the sub-window search quadratic: an input almost all zeros (every pixel is a
    candidate placement) with a few bright pixels (each probe removes a handful of placements, so
    the pruning never stalls), and a zero result with one odd pixel off the probe grid."""
    from cv_ray.sandbox.recognize import PROBE_GRID, _grid

    rng = np.random.default_rng(0)
    inp = np.zeros((side, side), np.uint8)
    inp[rng.integers(0, side, 6), rng.integers(0, side, 6)] = 200
    res = np.zeros((100, 100), np.uint8)
    off_grid = [v for v in range(100) if v not in set(_grid(100, PROBE_GRID).tolist())]
    res[off_grid[20], off_grid[20]] = 7
    return Image.fromarray(inp), Image.fromarray(res)


def test_verification_of_a_crafted_pair_stops_at_its_work_budget():
    """Class 6: the crafted pair costs the unbounded search many times the work budget; within the
    budget reconcile stops, reports the claimed op unverified and claims no map.

    Control: with an unlimited budget the same pair spends over 5x the default budget (the ratio
    grows with the input: 45x and 13 s for a 512 px input before the fix). Mutant: no ``spend`` in the probe loop of ``_search_subwindow``.
    """
    from cv_ray.sandbox.recognize import MIN_WORK, WORK_PER_PIXEL, VerificationBudget

    inp, res = _crafted_pair(256)
    default_work = max(MIN_WORK, WORK_PER_PIXEL * (256 * 256 + 100 * 100))
    unlimited = VerificationBudget(seconds=None, work=10**12)
    reconcile(inp, res, [], budget=unlimited)
    assert unlimited.spent > 5 * default_work and not unlimited.exhausted
    budget = VerificationBudget(seconds=None)
    hints = [{"op": "crop", "box": [10, 10, 110, 110], "src": 0, "dst": 1}]
    ops, to_input = reconcile(inp, res, hints, budget=budget)
    assert budget.exhausted and budget.spent <= default_work + 256 * 256
    assert ops == [{"op": "crop", "box": [10, 10, 110, 110], "frame_box": [10, 10, 110, 110], "unverified": True}]
    assert to_input is None


def test_verification_stops_at_its_time_budget():
    from cv_ray.sandbox.recognize import VerificationBudget

    budget = VerificationBudget(seconds=-1.0)  # already past: the first check stops it
    ops, to_input = reconcile(PHOTO, PHOTO.transpose(Image.Transpose.ROTATE_90), [{"op": "rotate_90"}], budget=budget)
    assert budget.exhausted and ops == [{"op": "rotate_90", "unverified": True}] and to_input is None


def test_a_result_that_matches_on_the_grid_only_is_not_exact():
    """Class 8: a quarter turn with every pixel off the sparse grids replaced by noise (94% of the
    image) is not ``rotate_90``: the claim is checked on every pixel.

    Control: the sparse grids alone (the check before the fix) accept it.
    Mutant: ``_exact`` returning the grid verdict without ``_exact_full``.
    """
    from cv_ray.sandbox.recognize import VerificationBudget, _exact_on_grid, _grid, _pair

    photo = Image.fromarray(data.astronaut()).resize((320, 240))
    quarter_turn = [[0.0, -1.0, 320.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    rotated = np.asarray(photo.transpose(Image.Transpose.ROTATE_90))
    h, w = rotated.shape[:2]
    kept = np.zeros((h, w), bool)
    for points in (16, 64):
        kept[np.ix_(_grid(h, points), _grid(w, points))] = True
    noise = np.random.default_rng(0).integers(0, 256, rotated.shape, dtype=np.uint8)
    forged = Image.fromarray(np.where(kept[..., None], rotated, noise))
    assert kept.mean() < 0.06
    pair = _pair(photo, forged, VerificationBudget())
    assert all(_exact_on_grid(pair, quarter_turn, pair.res, points) == (True, False) for points in (16, 64))
    assert reconcile(photo, forged, []) == ([], None)
    ops, to_input = reconcile(photo, forged, [{"op": "rotate_90", "src": 0, "dst": 1}])
    assert ops == [{"op": "rotate_90", "unverified": True}] and to_input is None


@pytest.mark.parametrize("resample", ["NEAREST", "BILINEAR", "BICUBIC", "LANCZOS", "BOX", "HAMMING"])
@pytest.mark.parametrize("box, size", [((30, 20, 110, 80), (40, 30)), ((30.5, 20.25, 110.5, 80), (200, 150))])
def test_every_resampling_of_a_crop_is_verified_on_every_pixel(tracer, resample, box, size):
    result, hints = execute(tracer, f"result = image.resize({size}, Image.Resampling.{resample}, box={box})")
    ops, to_input = reconcile(PHOTO, result, hints)
    assert [op["op"] for op in ops] == ["crop", "resize"] and not any(op.get("unverified") for op in ops)
    assert ops[0]["box"] == list(box) and to_input is not None


def test_a_resampled_crop_with_replaced_pixels_is_not_verified(tracer):
    """Class 8 for resampled views: 5% of the pixels replaced by noise fails the full-resolution
    tolerance check, although a low-resolution comparison (the check before the fix) accepts it.

    Mutant: ``_close`` with ``CLOSE_OUTLIERS = 1.0`` (no per-pixel check).
    """
    result, hints = execute(tracer, "result = image.resize((160, 120), box=(30, 20, 110, 80))")
    pixels = np.asarray(result).copy()
    rng = np.random.default_rng(1)
    replaced = rng.random(pixels.shape[:2]) < 0.05
    pixels[replaced] = rng.integers(0, 256, (int(replaced.sum()), 3), dtype=np.uint8)
    low = [cv2.resize(np.asarray(a, np.float32), (40, 30), interpolation=cv2.INTER_AREA)
           for a in (pixels, np.asarray(result))]
    assert np.abs(low[0] - low[1]).mean() <= 6.0  # what the low-resolution check saw: a match
    ops, to_input = reconcile(PHOTO, Image.fromarray(pixels), hints)
    assert all(op.get("unverified") for op in ops if op["op"] == "crop") and to_input is None


def test_fractional_geometry_never_crashes_verification():
    """Class 7: a crop with a half-pixel box and an odd width, on an input whose columns are all
    alike (so the result is exact) and a gray result with a claimed change (so every pixel is
    compared with a tolerance): the rounded box of the old full check was one pixel wider than the
    result and numpy raised.

    Mutant: the old ``_exact_everywhere`` (map_box rounded, then subtraction of unequal shapes).
    """
    gradient = np.repeat(np.arange(0, 192, 3, dtype=np.uint8)[:, None], 96, axis=1)
    inp = Image.fromarray(np.stack([gradient, gradient // 2, 255 - gradient], -1))
    result = inp.convert("L").crop((0, 0, 7, 8))
    hints = [{"op": "crop", "box": [0.5, 0, 7.5, 8], "src": 0, "dst": 1},
             {"op": "resize", "size": [7, 8], "src": 1, "dst": 2},
             {"op": "grayscale", "changed": True, "src": 2, "dst": 3}]
    ops, to_input = reconcile(inp, result, hints)
    assert [op["op"] for op in ops] == ["crop", "resize", "grayscale"]
    assert ops[0]["frame_box"] == [0.5, 0, 7.5, 8] and to_input == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_random_fractional_hints_never_crash_verification():
    """Forged hints with fractional and out-of-range boxes, odd sizes and every turn, on images of
    every mode: reconcile returns (it may find nothing), it never raises."""
    rng = np.random.default_rng(7)
    images = [PHOTO, PHOTO.convert("L"), SQUARE, Image.new("RGB", (33, 17), "gray"),
              Image.fromarray(np.repeat(np.arange(64, dtype=np.uint8)[None], 40, axis=0))]
    names = ["crop", "resize", "pad", "rotate_90", "rotate_180", "flip_horizontal", "grayscale", "contrast_up"]
    for i in range(300):
        inp = images[i % len(images)]
        result = images[rng.integers(len(images))].resize((int(rng.integers(1, 70)), int(rng.integers(1, 70))))
        hints = []
        for k in range(int(rng.integers(1, 4))):
            op = {"op": names[rng.integers(len(names))], "src": k, "dst": k + 1, "changed": bool(rng.integers(2))}
            x1, y1 = (round(float(v), 2) for v in rng.uniform(-5, 40, 2))
            op["box"] = [x1, y1, x1 + round(float(rng.uniform(1, 60)), 2), y1 + round(float(rng.uniform(1, 60)), 2)]
            op["size"] = [int(rng.integers(1, 70)), int(rng.integers(1, 70))]
            hints.append(op)
        reconcile(inp, result, hints)
