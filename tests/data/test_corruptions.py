"""Corruption ops: hand-checked box maps, exact inverses, reproducible natural corruptions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cv_ray.data.corruptions import (
    CORRUPTIONS,
    NATURAL_CORRUPTIONS,
    ORIENTATION_CORRUPTIONS,
    apply_corruptions,
    fix_ops,
    get_corruption,
    sample_corruption,
)

W, H = 100, 60
BOX = [10.0, 5.0, 30.0, 15.0]

# Hand derivation on a W=100 x H=60 image, box [10, 5, 30, 15] (exclusive ends):
# rotate_90 (CCW), (x, y) -> (y, W - x): (10, 5) -> (5, 90), (30, 15) -> (15, 70)  => [5, 70, 15, 90]
# rotate_180, (x, y) -> (W - x, H - y): (10, 5) -> (90, 55), (30, 15) -> (70, 45)  => [70, 45, 90, 55]
# rotate_270 (CW), (x, y) -> (H - y, x): (10, 5) -> (55, 10), (30, 15) -> (45, 30) => [45, 10, 55, 30]
# flip_horizontal, x -> W - x => [70, 5, 90, 15];  flip_vertical, y -> H - y => [10, 45, 30, 55]
EXPECTED = {
    "rotate_90": [5.0, 70.0, 15.0, 90.0],
    "rotate_180": [70.0, 45.0, 90.0, 55.0],
    "rotate_270": [45.0, 10.0, 55.0, 30.0],
    "flip_horizontal": [70.0, 5.0, 90.0, 15.0],
    "flip_vertical": [10.0, 45.0, 30.0, 55.0],
}
INVERSE = {"rotate_90": ["rotate_270"], "rotate_180": ["rotate_180"], "rotate_270": ["rotate_90"],
           "flip_horizontal": ["flip_horizontal"], "flip_vertical": ["flip_vertical"]}


def _marked_image() -> Image.Image:
    image = Image.new("RGB", (W, H), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1], fill=(255, 0, 0))
    return image


def _red_bbox(image: Image.Image) -> list[float]:
    red = np.all(np.asarray(image) == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("name", ORIENTATION_CORRUPTIONS)
def test_orientation_box_map_matches_hand_derivation_and_pixels(name):
    record = sample_corruption(name, np.random.default_rng(0))
    corrupted, box = apply_corruptions(_marked_image(), BOX, [record])
    assert box == EXPECTED[name]
    assert _red_bbox(corrupted) == EXPECTED[name]
    assert fix_ops([record]) == INVERSE[name]


@pytest.mark.parametrize("name", ORIENTATION_CORRUPTIONS)
def test_fix_op_undoes_the_corruption_exactly(name):
    clean = _marked_image()
    corrupted, box = apply_corruptions(clean, BOX, [sample_corruption(name, np.random.default_rng(0))])
    # A fix op is the same pixel transform as the corruption of the same name.
    fixed, fixed_box = apply_corruptions(corrupted, box, [{"name": op, "params": {}} for op in INVERSE[name]])
    assert np.array_equal(np.asarray(fixed), np.asarray(clean))
    assert fixed_box == BOX


def test_chain_of_corruptions_is_fixed_in_reverse_order():
    records = [{"name": "rotate_90", "params": {}}, {"name": "flip_horizontal", "params": {}}]
    assert fix_ops(records) == ["flip_horizontal", "rotate_270"]
    corrupted, box = apply_corruptions(_marked_image(), BOX, records)
    fixed, fixed_box = apply_corruptions(corrupted, box, [{"name": op, "params": {}} for op in fix_ops(records)])
    assert np.array_equal(np.asarray(fixed), np.asarray(_marked_image()))
    assert fixed_box == BOX


@pytest.mark.parametrize("name", NATURAL_CORRUPTIONS)
def test_natural_corruptions_keep_the_frame_and_are_reproducible(name):
    clean = _marked_image()
    record = sample_corruption(name, np.random.default_rng(3))
    first, box = apply_corruptions(clean, BOX, [record])
    second, _ = apply_corruptions(clean, BOX, [record])
    assert box == BOX and first.size == clean.size
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first.convert("RGB")), np.asarray(clean))
    assert get_corruption(name).fix_ops[0] in ("denoise", "sharpen", "contrast_up", "brightness_up")


def test_low_contrast_and_darken_do_what_they_say():
    clean = _marked_image()
    dark, _ = apply_corruptions(clean, None, [{"name": "darken", "params": {"factor": 0.3}}])
    flat, _ = apply_corruptions(clean, None, [{"name": "low_contrast", "params": {"factor": 0.3}}])
    assert np.asarray(dark).mean() < 0.35 * np.asarray(clean).mean()
    assert np.asarray(flat).std() < 0.35 * np.asarray(clean).std()


def test_unknown_corruption_is_named():
    with pytest.raises(KeyError, match="sepia"):
        get_corruption("sepia")
    assert set(CORRUPTIONS) == set(ORIENTATION_CORRUPTIONS) | set(NATURAL_CORRUPTIONS)
