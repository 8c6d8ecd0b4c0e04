"""Tool images resized for the model: area within bounds, aspect ratio kept (hand-derived sizes)."""

from __future__ import annotations

from PIL import Image

from cv_ray.agent.model_images import fit_pixels, resize_for_model


def test_in_range_is_unchanged():
    assert fit_pixels(100, 50, 1000, 10000) == (100, 50)


def test_shrink_rounds_down_below_max():
    # 400 x 100 = 40000 px, max 10000: scale sqrt(10000 / 40000) = 0.5 -> 200 x 50 = 10000.
    assert fit_pixels(400, 100, 100, 10000) == (200, 50)
    # 300 x 300 = 90000, max 10000: scale 1/3 -> 100 x 100 exactly; 301 x 301 -> floor(100.33) = 100.
    assert fit_pixels(301, 301, 100, 10000) == (100, 100)


def test_enlarge_rounds_up_above_min():
    # 10 x 5 = 50 px, min 800: scale 4 -> 40 x 20 = 800.
    assert fit_pixels(10, 5, 800, 10000) == (40, 20)
    # 7 x 7 = 49, min 100: scale 10/7 -> ceil(10.0) = 10 -> 10 x 10.
    assert fit_pixels(7, 7, 100, 10000) == (10, 10)


def test_resize_for_model_keeps_the_original_when_in_range():
    image = Image.new("RGB", (64, 48))
    assert resize_for_model(image, 100, 100000) is image
    small = resize_for_model(image, 100, 768)  # 3072 px -> scale 0.5 -> 32 x 24
    assert small.size == (32, 24)
