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
