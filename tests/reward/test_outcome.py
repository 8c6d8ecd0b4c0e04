"""Trajectory -> SampleOutcome: crop boxes mapped back to image 0 through real rotation geometry.

Derivation of PIL's ROTATE_90 (counter-clockwise) for a W x H input: the result is H wide and W high;
the input's top-right corner (W, 0) becomes the result's top-left (0, 0), and the input's top-left
(0, 0) becomes the result's bottom-left (0, W). So an input point (x, y) lands at (y, W - x), and the
result -> input map (``to_input``) is (x, y) -> (W - y, x):

    to_input = [[0, -1, W],
                [1,  0, 0],
                [0,  0, 1]]

The test checks this on corner points and on real pixels before using it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reward_testlib import call, task, text, trajectory

from cv_ray.geometry import apply, compose, identity, translation
from cv_ray.reward.config import RewardConfig
from cv_ray.reward.dense import score_group
from cv_ray.reward.outcome import outcome_from_trajectory
from cv_ray.types import ToolCallRecord

W, H = 200, 100
ANSWER_BOX = [150, 20, 190, 60]          # image 0 frame: x 150..190, y 20..60
# in the rotated image: x' = y in 20..60, y' = W - x in 10..50
BOX_IN_ROTATED = [20, 10, 60, 50]
TO_INPUT_ROT90 = [[0.0, -1.0, float(W)], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def _images():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, size=(H, W, 3), dtype=np.uint8)
    pixels[20:60, 150:190] = (255, 0, 0)  # the answer region, pure red (rows are y, columns x)
    image0 = Image.fromarray(pixels)
    image1 = image0.transpose(Image.Transpose.ROTATE_90)
    image2 = image1.crop(BOX_IN_ROTATED)
    return image0, image1, image2


def test_rotation_matrix_matches_pil():
    image0, image1, image2 = _images()
    assert image1.size == (H, W)
    # corners: result (0, 0) is input (W, 0); result (H, W) is input (0, H)
    assert apply(TO_INPUT_ROT90, 0, 0) == (W, 0)
    assert apply(TO_INPUT_ROT90, H, W) == (0, H)
    # pixels: the result pixel (xr, yr) covers [xr, xr+1) x [yr, yr+1); its centre maps to input
    # (W - yr - 0.5, xr + 0.5), i.e. the input pixel (W - 1 - yr, xr)
    for xr, yr in [(0, 0), (H - 1, W - 1), (37, 123), (5, 190)]:
        x, y = apply(TO_INPUT_ROT90, xr + 0.5, yr + 0.5)
        assert image1.getpixel((xr, yr)) == image0.getpixel((int(x), int(y)))
    # the crop on the rotated image shows exactly the answer region
    assert set(image2.getdata()) == {(255, 0, 0)}


def _rotate_then_crop_trajectory(crop_box, extra_calls=()):
    image0, image1, image2 = _images()
    calls = [
        call(0, [{"op": "rotate_90"}], output_index=1, to_input=TO_INPUT_ROT90,
             code="result = image.transpose(Image.ROTATE_90)"),
        call(1, [{"op": "crop", "box": crop_box}], output_index=2, to_input=translation(crop_box[0], crop_box[1]),
             code=f"result = image.crop(({', '.join(str(v) for v in crop_box)}))"),
        *extra_calls,
    ]
    image_to_origin = [identity(), TO_INPUT_ROT90, compose(TO_INPUT_ROT90, translation(crop_box[0], crop_box[1]))]
    return trajectory([image0, image1, image2], image_to_origin, calls, text("red"))


def test_crop_on_a_rotated_image_is_mapped_back_to_image_0():
    outcome = outcome_from_trajectory(_rotate_then_crop_trajectory(BOX_IN_ROTATED))
    rotate, crop = outcome.ops
    assert (rotate.name, crop.name) == ("rotate_90", "crop")
    # corners (20, 10) -> (W - 10, 20) = (190, 20) and (60, 50) -> (150, 60): the answer box
    assert crop.box == pytest.approx(ANSWER_BOX)
    assert crop.raw_box == BOX_IN_ROTATED
    assert (outcome.num_code_calls, outcome.num_tool_errors) == (2, 0)


def test_rotate_then_crop_reward_fixed_vs_reference():
    t = task(required=["rotate_90", "crop"], answer_box=ANSWER_BOX, answer="red", task_type="ocr")
    outcome = outcome_from_trajectory(_rotate_then_crop_trajectory(BOX_IN_ROTATED))
    (fixed,) = score_group(t, [outcome], RewardConfig())
    # fixed: IoU 1 in image 0's frame -> mandatory (1 + 1) / 2 = 1; exact 1 -> 1 + .1 + 1 + .1 = 2.2
    assert fixed.stats["iou"] == pytest.approx(1.0)
    assert fixed.terms["mandatory"] == pytest.approx(1.0)
    assert fixed.total == pytest.approx(2.2)
    (compat,) = score_group(t, [outcome], RewardConfig(reference_compat=True))
    # reference: the code's box [20, 10, 60, 50] vs [150, 20, 190, 60] is disjoint -> IoU 0 ->
    # mandatory 1/2 + 0/2 = 0.5 (>= gate, acc kept) -> 1 + .1 + .5 + .1 = 1.7
    assert compat.stats["iou"] == 0.0
    assert compat.terms["mandatory"] == pytest.approx(0.5)
    assert compat.total == pytest.approx(1.7)


def test_failed_and_unparsed_calls():
    """Follows agent_loop.py ``_code_usage_penalty`` and tool_agent_loop.py (calls counted before they run;
    an unparsable one is dropped). Mutant: compat counts the unparsed call (total 0.6)."""
    unparsed = ToolCallRecord(turn=3, parsed=False, parse_error_class="malformed_json", payload='{"name": ')
    # a partial op reported by a call that then failed
    failed = call(2, [{"op": "flip_vertical"}], ok=False, code="result = image.transpose(Image.FLIP_TOP_BOTTOM)")
    outcome = outcome_from_trajectory(_rotate_then_crop_trajectory(BOX_IN_ROTATED, [failed, unparsed]))
    assert (outcome.num_code_calls, outcome.num_tool_errors) == (4, 2)
    assert [(o.name, o.call_ok) for o in outcome.ops] == [("rotate_90", True), ("crop", True), ("flip_vertical", False)]
    t = task(required=["rotate_90", "crop"], answer_box=ANSWER_BOX, answer="red", task_type="ocr")
    (fixed,) = score_group(t, [outcome], RewardConfig())
    # fixed: the failed flip applied nothing -> exact holds; usage 4 - max(2, 2) = 2 -> 2.2 - 0.5 * 2 = 1.2
    assert fixed.terms["exact"] == 1.0
    assert fixed.total == pytest.approx(1.2)
    (compat,) = score_group(t, [outcome], RewardConfig(reference_compat=True))
    # reference: the failed call's flip is read from its code -> core used != required -> no exact;
    # mandatory 0.5 (the code's box); the unparsable call is dropped -> usage 3 - 2 = 1 ->
    # 1 + .1 + .5 - .5 * 1 = 1.1
    assert compat.terms["exact"] == 0.0
    assert (compat.stats["calls"], compat.terms["usage"]) == (3.0, 1.0)
    assert compat.total == pytest.approx(1.1)


def test_changed_flag_and_unmapped_source_images():
    image0, _, _ = _images()
    enhanced = image0.copy()
    calls = [call(0, [{"op": "contrast_up", "factor": 1.0, "changed": False}], output_index=1),
             call(1, [{"op": "crop", "box": [0, 0, 10, 10]}], output_index=2)]
    # image 1 is not a geometric view of image 0 (None): its crop cannot be located in image 0
    outcome = outcome_from_trajectory(trajectory([image0, enhanced, enhanced], [identity(), None, None], calls, ""))
    contrast, crop = outcome.ops
    assert contrast.changed is False
    assert crop.box is None and crop.raw_box == [0.0, 0.0, 10.0, 10.0]
