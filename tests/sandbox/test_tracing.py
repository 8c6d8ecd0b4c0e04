"""The child-side tracer: what many styles of PIL / numpy / OpenCV code record, run in-process.

Each test installs nothing itself: a module fixture installs the tracer once (as the zygote does)
and uninstalls it afterwards so other tests in this process see the original libraries.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from skimage import data

from cv_ray.sandbox.tracing import OpTracer

# A non-square real photo, so that a quarter turn changes the size.
PHOTO = Image.fromarray(data.astronaut()).resize((160, 120))


@pytest.fixture(scope="module")
def tracer():
    originals = (Image.Image.rotate, np.array, cv2.rotate, ImageEnhance.Contrast.__init__)
    tracer = OpTracer()
    tracer.install()
    yield tracer
    tracer.uninstall()
    assert (Image.Image.rotate, np.array, cv2.rotate, ImageEnhance.Contrast.__init__) == originals


def run(tracer: OpTracer, code: str, image: Image.Image = PHOTO, with_result: bool = True):
    """Execute model-style code the way the sandbox child does; return (result, traced ops)."""
    image = image.copy()
    namespace = {"image": image, "img": image, "draw": ImageDraw.Draw(image), "Image": Image,
                 "ImageOps": ImageOps, "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter,
                 "ImageDraw": ImageDraw, "ImageFont": ImageFont, "np": np, "numpy": np, "cv2": cv2,
                 "cv": cv2, "math": math}
    tracer.begin(image)
    exec(code, namespace)  # noqa: S102 -- running model-style code is the point of these tests
    result = namespace["result"]
    traced = tracer.ops(result=result if with_result else None)
    tracer.end()
    assert tracer.errors == 0
    assert json.loads(json.dumps(traced)) == traced  # crosses the pipe as JSON
    return result, traced


def names(traced):
    return [op["op"] for op in traced]


# -- orientation, in every library -------------------------------------------------------------

@pytest.mark.parametrize("code,expected", [
    ("result = image.rotate(90, expand=True)", ["rotate_90"]),
    ("result = image.rotate(-90, expand=True)", ["rotate_270"]),
    ("result = image.rotate(180)", ["rotate_180"]),
    ("result = img.transpose(Image.ROTATE_90)", ["rotate_90"]),
    ("result = img.transpose(Image.Transpose.ROTATE_270)", ["rotate_270"]),
    ("result = img.transpose(Image.FLIP_LEFT_RIGHT)", ["flip_horizontal"]),
    ("result = img.transpose(Image.FLIP_TOP_BOTTOM)", ["flip_vertical"]),
    ("result = img.transpose(Image.TRANSPOSE)", ["flip_horizontal", "rotate_90"]),
    ("result = img.transpose(Image.TRANSVERSE)", ["flip_horizontal", "rotate_270"]),
    ("result = ImageOps.mirror(image)", ["flip_horizontal"]),
    ("result = ImageOps.flip(image)", ["flip_vertical"]),
    ("result = Image.fromarray(np.rot90(np.array(img)))", ["rotate_90"]),
    ("result = Image.fromarray(np.rot90(np.asarray(img), k=3))", ["rotate_270"]),
    ("result = Image.fromarray(np.rot90(np.array(img), -1))", ["rotate_270"]),
    ("result = Image.fromarray(np.rot90(np.array(img), 2))", ["rotate_180"]),
    ("result = np.rot90(img)", ["rotate_90"]),  # a PIL image straight into numpy
    ("result = np.fliplr(np.array(image))", ["flip_horizontal"]),
    ("result = np.flipud(np.array(image))", ["flip_vertical"]),
    ("result = np.flip(np.array(image), axis=1)", ["flip_horizontal"]),
    ("result = np.array(image)[::-1, ::-1]", ["rotate_180"]),
    ("result = np.transpose(np.array(image), (1, 0, 2))", ["flip_horizontal", "rotate_90"]),
    ("a = np.array(image.convert('L')); result = a.T", ["grayscale", "flip_horizontal", "rotate_90"]),
    ("result = cv2.rotate(np.array(img), cv2.ROTATE_90_COUNTERCLOCKWISE)", ["rotate_90"]),
    ("result = cv2.rotate(np.array(img), cv2.ROTATE_90_CLOCKWISE)", ["rotate_270"]),
    ("result = cv2.rotate(np.array(img), cv2.ROTATE_180)", ["rotate_180"]),
    ("result = cv2.flip(np.array(img), 1)", ["flip_horizontal"]),
    ("result = cv2.flip(np.array(img), 0)", ["flip_vertical"]),
    ("result = cv2.flip(np.array(img), -1)", ["rotate_180"]),
    ("result = cv2.transpose(np.array(img))", ["flip_horizontal", "rotate_90"]),
])
def test_orientation_ops_in_every_style(tracer, code, expected):
    _, traced = run(tracer, code)
    assert names(traced) == expected


def test_nested_library_calls_are_recorded_once(tracer):
    # PIL's rotate(90, expand=True) calls transpose, ImageOps.mirror calls transpose,
    # ImageEnhance.Contrast's constructor calls convert("L"): only the outer calls count.
    _, traced = run(tracer, "result = ImageEnhance.Contrast(ImageOps.mirror(image.rotate(90, expand=True))).enhance(2)")
    assert names(traced) == ["rotate_90", "flip_horizontal", "contrast_up"]
    assert traced[0]["angle"] == 90.0 and traced[0]["expand"] is True


def test_records_link_into_a_lineage_chain(tracer):
    _, traced = run(tracer, "result = image.rotate(90, expand=True).crop((10, 20, 60, 70))")
    assert [(op["src"], op["dst"]) for op in traced] == [(0, 1), (1, 2)]


# -- crops and their frames ---------------------------------------------------------------------

def test_pil_crop_records_its_box_in_both_frames(tracer):
    result, traced = run(tracer, "result = image.crop((30, 20, 90, 70))")
    assert result.size == (60, 50)
    assert traced == [{"op": "crop", "box": [30, 20, 90, 70], "frame_box": [30, 20, 90, 70], "via": "Image.crop",
                       "src": 0, "input_box": [30.0, 20.0, 90.0, 70.0], "dst": 1}]


def test_crop_of_a_rotated_image_is_mapped_back_to_the_input_frame(tracer):
    # rotate_90 of the 160 x 120 input gives 120 x 160; rotated pixel (x', y') shows input pixel
    # (160 - y', x'). The crop [10, 20, 60, 70] of the rotated image therefore covers input
    # x in [160 - 70, 160 - 20] = [90, 140] and y in [10, 60].
    _, traced = run(tracer, "result = image.rotate(90, expand=True).crop((10, 20, 60, 70))")
    crop = traced[1]
    assert crop["box"] == [10, 20, 60, 70]
    assert crop["input_box"] == [90.0, 10.0, 140.0, 60.0]


@pytest.mark.parametrize("code,box", [
    ("result = np.array(img)[20:70, 30:90]", [30, 20, 90, 70]),
    ("a = np.asarray(image); result = Image.fromarray(a[20:70, 30:90])", [30, 20, 90, 70]),
    ("a = np.array(image); y1, y2, x1, x2 = 20, 70, 30, 90; result = a[y1:y2, x1:x2, :]", [30, 20, 90, 70]),
    ("result = np.array(img)[20:70][:, 30:90]", [30, 20, 90, 70]),
    ("result = cv2.resize(np.array(img)[20:70, 30:90], (120, 100))", [30, 20, 90, 70]),
    ("result = ImageOps.crop(image, 10)", [10, 10, 150, 110]),
    ("result = image.resize((120, 100), box=(30, 20, 90, 70))", [30, 20, 90, 70]),
])
def test_crops_in_every_style(tracer, code, box):
    _, traced = run(tracer, code)
    assert traced[0]["op"] == "crop"
    assert traced[0]["box"] == box


def test_numpy_slice_of_a_turned_array_is_a_crop_then_the_turn(tracer):
    # np.rot90(a)[10:60, 20:100]: the rotated view's rows 10..60 are input columns 160-60..160-10
    # = 100..150 and its columns 20..100 are input rows 20..100. Canonical form: crop, then turn.
    _, traced = run(tracer, "result = np.rot90(np.array(img))[10:60, 20:100]")
    assert names(traced) == ["crop", "rotate_90"]
    assert traced[0]["box"] == [100, 20, 150, 100]


def test_a_channel_reversal_view_is_a_colour_change_not_geometry(tracer):
    _, traced = run(tracer, "result = np.array(image)[:, :, ::-1]")
    assert traced == [{"op": "color_convert", "via": "numpy.view", "changed": True, "src": 0, "dst": 1}]


# -- photometric ops and the `changed` flag -------------------------------------------------------

@pytest.mark.parametrize("enhancer,factor,expected,changed", [
    ("Contrast", 1.8, "contrast_up", True), ("Contrast", 0.5, "contrast_down", True),
    ("Brightness", 1.3, "brightness_up", True), ("Brightness", 0.4, "brightness_down", True),
    ("Sharpness", 2.0, "sharpness_up", True), ("Color", 0.0, "saturation_down", True),
    ("Contrast", 1.0, "contrast_up", False), ("Brightness", 1.0, "brightness_up", False),
])
def test_enhance_records_direction_factor_and_whether_it_changed_anything(tracer, enhancer, factor, expected, changed):
    _, traced = run(tracer, f"result = ImageEnhance.{enhancer}(image).enhance({factor})")
    assert traced == [{"op": expected, "via": f"ImageEnhance.{enhancer}", "factor": float(factor),
                       "changed": changed, "src": 0, "dst": 1}]


@pytest.mark.parametrize("code,expected", [
    ("result = image.filter(ImageFilter.GaussianBlur(2))", "blur"),
    ("result = image.filter(ImageFilter.BLUR)", "blur"),
    ("result = image.filter(ImageFilter.SHARPEN)", "sharpen"),
    ("result = image.filter(ImageFilter.FIND_EDGES)", "edge_detection"),
    ("result = image.filter(ImageFilter.MaxFilter(3))", "morphology"),
    ("result = image.convert('L')", "grayscale"),
    ("result = ImageOps.grayscale(image)", "grayscale"),
    ("result = ImageOps.autocontrast(image, cutoff=2)", "autocontrast"),
    ("result = ImageOps.equalize(image)", "equalize"),
    ("result = ImageOps.invert(image)", "invert"),
    ("result = ImageOps.posterize(image, 3)", "posterize"),
    ("result = image.point(lambda v: 255 - v)", "lut"),
    ("result = cv2.GaussianBlur(np.array(image), (5, 5), 0)", "blur"),
    ("result = cv2.medianBlur(np.array(image), 5)", "denoise"),
    ("result = image.filter(ImageFilter.MedianFilter(3))", "denoise"),
    ("result = cv2.fastNlMeansDenoisingColored(np.array(image), None, 5, 5, 7, 21)", "denoise"),
    ("result = cv2.Canny(np.array(image), 50, 150)", "edge_detection"),
    ("result = cv2.threshold(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY), 127, 255, cv2.THRESH_BINARY)[1]",
     "threshold"),
    ("result = cv2.equalizeHist(np.array(image.convert('L')))", "equalize"),
    ("result = cv2.convertScaleAbs(np.array(image), alpha=1.6, beta=0)", "contrast_up"),
    ("result = cv2.convertScaleAbs(np.array(image), alpha=1.0, beta=-40)", "brightness_down"),
    ("result = cv2.bitwise_not(np.array(image))", "invert"),
    ("result = cv2.dilate(np.array(image), np.ones((3, 3), np.uint8))", "morphology"),
])
def test_photometric_ops_in_every_style(tracer, code, expected):
    _, traced = run(tracer, code)
    assert traced[-1]["op"] == expected
    assert traced[-1]["changed"] is True


def test_unchanging_photometric_ops_are_marked_unchanged(tracer):
    gray = PHOTO.convert("L").convert("RGB")  # colour image with gray content
    _, traced = run(tracer, "result = image.convert('L')", image=gray)
    assert traced[-1] == {"op": "grayscale", "via": "Image.convert", "changed": False, "src": 0, "dst": 1}
    _, traced = run(tracer, "result = cv2.convertScaleAbs(np.array(image), alpha=1.0, beta=0)")
    assert traced[-1]["changed"] is False
    _, traced = run(tracer, "result = image.resize(image.size)")
    assert traced == [{"op": "resize", "size": [160, 120], "via": "Image.resize", "changed": False, "src": 0, "dst": 1}]


def test_a_change_the_sample_grid_misses_is_caught_by_the_exact_comparison(tracer):
    # One dark pixel at (100, 100) of a bright 320 x 320 image; MinFilter(3) spreads it over
    # 99..101, between the nearest-neighbour sample points (5, 15, ..., 95, 105, ...): the sample
    # sees no difference, the full comparison does.
    dotted = Image.new("L", (320, 320), 200)
    dotted.putpixel((100, 100), 0)
    _, traced = run(tracer, "result = image.filter(ImageFilter.MinFilter(3))", image=dotted)
    assert traced[-1]["op"] == "morphology" and traced[-1]["changed"] is True
    _, traced = run(tracer, "result = image.filter(ImageFilter.MinFilter(3))", image=Image.new("L", (320, 320), 200))
    assert traced[-1]["changed"] is False


def test_drawing_is_recorded_in_place_and_merged(tracer):
    _, traced = run(tracer, "for i in range(5): draw.rectangle((i, i, i + 10, i + 10), outline='red')\n"
                            "result = image")
    assert traced == [{"op": "draw", "via": "ImageDraw", "changed": True, "src": 0, "dst": 1, "count": 5}]
    _, traced = run(tracer, "a = np.array(image); cv2.rectangle(a, (5, 5), (40, 40), (255, 0, 0), 2); result = a")
    assert names(traced) == ["draw"] and traced[0]["via"] == "cv2.rectangle"


# -- geometry beyond the core ops ----------------------------------------------------------------

def test_free_rotation_and_resize_and_padding(tracer):
    _, traced = run(tracer, "result = image.rotate(30)")
    assert traced == [{"op": "rotate_arbitrary", "angle": 30.0, "expand": False, "via": "Image.rotate",
                       "changed": True, "src": 0, "dst": 1}]
    _, traced = run(tracer, "image.thumbnail((80, 80)); result = image")
    assert traced[0]["op"] == "resize" and traced[0]["size"] == [80, 60]
    _, traced = run(tracer, "result = ImageOps.expand(image, border=(4, 6), fill='white')")
    assert traced[0]["op"] == "pad" and traced[0]["box"] == [-4, -6, 164, 126]
    _, traced = run(tracer, "result = cv2.copyMakeBorder(np.array(image), 2, 3, 4, 5, cv2.BORDER_CONSTANT)")
    assert traced[0]["op"] == "pad" and traced[0]["box"] == [-4, -2, 165, 123]


def test_warp_affine_is_decomposed_when_axis_aligned(tracer):
    # A quarter turn about the centre into a swapped canvas, written the usual OpenCV way.
    code = ("a = np.array(image); h, w = a.shape[:2]\n"
            "M = cv2.getRotationMatrix2D((w / 2, h / 2), 90, 1.0)\n"
            "M[0, 2] += (h - w) / 2; M[1, 2] += (w - h) / 2\n"
            "result = cv2.warpAffine(a, M, (h, w))")
    _, traced = run(tracer, code)
    assert "rotate_90" in names(traced)
    _, traced = run(tracer, "a = np.array(image); M = cv2.getRotationMatrix2D((80, 60), 25, 1.0)\n"
                            "result = cv2.warpAffine(a, M, (160, 120))")
    # OpenCV's positive angle turns counter-clockwise on screen, like PIL's: recorded as +25.
    assert names(traced) == ["rotate_arbitrary"] and traced[0]["angle"] == pytest.approx(25.0)


# -- lineage ----------------------------------------------------------------------------------

def test_side_computations_are_not_part_of_the_result(tracer):
    code = ("gray = image.convert('L')\n"
            "mean = np.array(gray).mean()\n"
            "result = image.rotate(90, expand=True) if mean > 0 else image")
    _, traced = run(tracer, code)
    assert names(traced) == ["rotate_90"]
    _, everything = run(tracer, code, with_result=False)
    assert names(everything) == ["grayscale", "rotate_90"]


def test_a_result_copied_outside_the_wrappers_has_no_lineage(tracer):
    # `a.copy()` is an ndarray method (not patchable); the tracer then returns all records and
    # the parent recognises the crop from the pixels.
    result, traced = run(tracer, "a = np.array(image); result = a[20:70, 30:90].copy()")
    assert traced == []
    assert result.shape == (50, 60, 3)


def test_inactive_tracer_records_nothing_and_changes_no_result(tracer):
    expected = np.asarray(PHOTO.rotate(90, expand=True))
    tracer.begin(PHOTO)
    tracer.end()
    out = np.asarray(PHOTO.rotate(90, expand=True))
    assert np.array_equal(out, expected)
    assert tracer.ops() == []


def test_untraced_inputs_are_recorded_without_lineage(tracer):
    # An op on an image the tracer never saw (built from scratch) is still recorded, with no src.
    _, traced = run(tracer, "other = Image.new('RGB', (50, 40), 'white'); result = other.rotate(90, expand=True)")
    assert traced == [{"op": "rotate_90", "angle": 90.0, "expand": True, "via": "Image.rotate", "dst": 1}]
