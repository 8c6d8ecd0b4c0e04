"""Hand-computed checks of the robustness metrics."""

from __future__ import annotations

import pytest

from cv_ray.eval.metrics import EvalRecord, accuracy_by, consistency, op_precision_recall, summarize


def rec(base, transform, correct, **kw):
    return EvalRecord(task_uid=f"{base}/{transform}", suite="orientation", transform=transform, base_id=base,
                      with_tools=True, correct=correct, **kw)


def test_accuracy_by_transform():
    records = [rec("q1", "none", True), rec("q2", "none", False), rec("q1", "rotate_90", True)]
    # none: 1 of 2 correct; rotate_90: 1 of 1
    assert accuracy_by(records, "transform") == {"none": 0.5, "rotate_90": 1.0}


def test_consistency_counts_bases_correct_in_every_variant():
    records = [
        rec("q1", "none", True), rec("q1", "rotate_90", True), rec("q1", "flip_horizontal", True),  # consistent
        rec("q2", "none", True), rec("q2", "rotate_90", False),                                       # not
        rec("q3", "none", True),                                                                      # 1 variant: ignored
    ]
    assert consistency(records) == 0.5
    # majority vote within a variant: 2 of 3 samples correct counts as correct
    votes = [rec("q1", "none", True), rec("q1", "rotate_90", True), rec("q1", "rotate_90", True),
             rec("q1", "rotate_90", False)]
    assert consistency(votes) == 1.0
    assert consistency([rec("q1", "none", True)]) is None


def test_op_precision_recall_micro_average():
    records = [
        # used {rotate_270, crop}, required {rotate_270}: hit 1, used 2, required 1
        rec("a", "rotate_90", True, ops_used=["rotate_270", "crop"], required_ops=["rotate_270"]),
        # used {}, required {crop}: hit 0, used 0, required 1
        rec("b", "none", False, ops_used=[], required_ops=["crop"]),
        # non-core ops are ignored with core_only: used {contrast_up} -> {}
        rec("c", "low_contrast", True, ops_used=["contrast_up"], required_ops=["contrast_up"]),
    ]
    precision, recall = op_precision_recall(records)
    assert precision == pytest.approx(1 / 2)  # 1 hit / 2 used
    assert recall == pytest.approx(1 / 2)     # 1 hit / 2 required
    p_all, r_all = op_precision_recall(records, core_only=False)
    assert p_all == pytest.approx(2 / 3) and r_all == pytest.approx(2 / 3)


def test_summarize_tool_statistics():
    records = [
        rec("a", "rotate_90", True, tool_calls=2, tool_errors={"runtime": 1}, turns=3, crop_iou=0.5,
            required_ops=["rotate_270", "crop"]),
        rec("b", "none", False, tool_calls=0, turns=1, required_ops=["crop"]),
    ]
    s = summarize(records)
    assert s["n"] == 2 and s["accuracy"] == 0.5
    assert s["tool_use_rate"] == 0.5
    assert s["tool_calls_per_sample"] == 1.0
    assert s["tool_error_rate"] == 0.5            # 1 error / 2 calls
    assert s["tool_errors_by_class"] == {"runtime": 1}
    assert s["mean_turns"] == 2.0
    assert s["crop_iou_mean"] == 0.5
    assert s["crop_rate_when_required"] == 0.5    # a cropped, b did not
    assert s["tool_use_rate_by_transform"] == {"none": 0.0, "rotate_90": 1.0}


def test_report_writes_documented_files(tmp_path):
    from PIL import Image

    from cv_ray.eval.report import write_report

    with_tools = [rec("q1", "none", True, tool_calls=1), rec("q1", "rotate_90", True, tool_calls=1)]
    without = [rec("q1", "none", True), rec("q1", "rotate_90", False)]
    for r in without:
        r.with_tools = False
    paths = write_report(tmp_path, {"with_tools": summarize(with_tools), "without_tools": summarize(without)})
    report = paths["report"].read_text()
    assert "| accuracy | 1.000 | 0.500 |" in report
    assert "| rotate_90 | 1.000 | 0.000 |" in report
    for key in ("accuracy_plot", "tool_use_plot"):
        with Image.open(paths[key]) as im:
            assert im.width > 100 and im.height > 100
            # a non-empty plot: more than one colour on the canvas
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 2
