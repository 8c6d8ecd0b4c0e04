"""The dense process reward (fixed variant unless stated), term by term, with hand-computed tables.

Reference weights (RewardConfig defaults): w_acc 1, w_fmt 0.1, alpha 1, beta 0, exact 0.1, emerge 0.2,
gamma 0.5, free calls 2, crop gate 0.1. Each row gives the unweighted components and the total, with
the arithmetic in a comment. ``text(..)`` responses are well formed (R_fmt = 1) unless stated.
"""

from __future__ import annotations

import dataclasses

import pytest
from reward_testlib import op, sample, task

from cv_ray.reward.config import RewardConfig
from cv_ray.reward.dense import mean_breakdown, necessity_terms, score_group
from cv_ray.types import RewardBreakdown

FIXED = RewardConfig()
COMPAT = RewardConfig(reference_compat=True)
TERMS = ("acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage", "spurious")


def check(breakdown: RewardBreakdown, expected_terms: dict[str, float], total: float) -> None:
    assert set(breakdown.terms) == set(TERMS), "terms hold exactly the weighted terms (log-only numbers go to stats)"
    terms = {name: breakdown.terms[name] for name in TERMS}
    assert terms == pytest.approx({name: expected_terms.get(name, 0.0) for name in TERMS})
    assert breakdown.total == pytest.approx(total)


def test_no_required_ops():
    t = task(required=[], answer="7", task_type="count")
    samples = [
        sample(True),
        # 3 calls using rotate_90 and flip_horizontal (flip used twice) although nothing was required:
        # C_usage = 3 - max(2, 0) = 1; R_spurious = |{rotate_90, flip_horizontal}| = 2.
        sample(True, [op("rotate_90"), op("flip_horizontal"), op("flip_horizontal")], calls=3),
        sample(False, well_formed=False),
    ]
    out = score_group(t, samples, FIXED)
    check(out[0], {"acc": 1, "fmt": 1}, 1.1)                                    # 1 + 0.1
    # necessity: with tools 1/1 correct, without 1/2 (fewer than 2 correct) -> 0.5, weighted by beta = 0
    check(out[1], {"acc": 1, "fmt": 1, "usage": 1, "spurious": 2, "necessity": 0.5}, -0.4)  # 1 + .1 - .5 * (1 + 2)
    check(out[2], {}, 0.0)


def test_rotation_only():
    t = task(required=["rotate_90"])
    samples = [
        sample(True, [op("rotate_90")]),
        sample(True, [op("rotate_270")]),                                 # the wrong turn
        sample(True, [op("rotate_90"), op("contrast_up")]),               # a non-core op that changed the image
        sample(True, [op("rotate_90"), op("resize")]),                    # resize never earns R_emerge
        sample(True, [op("rotate_90"), op("contrast_up", changed=False)]),  # enhance(1.0): changed nothing
        sample(False, [op("rotate_90", ok=False)], errors=1),             # the only call failed
    ]
    out = score_group(t, samples, FIXED)
    # mandatory = 1/1; exact: core used {rotate_90} == core required -> 1
    check(out[0], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)     # 1 + 0.1 + 1 + 0.1
    check(out[1], {"acc": 1, "fmt": 1}, 1.1)                                 # no mandatory, no exact; E has a turn,
    #                                                                          so a wrong turn is not "spurious"
    check(out[2], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1, "emerge": 1}, 2.4)  # 2.2 + 0.2 = the maximum
    check(out[3], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)
    check(out[4], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)
    check(out[5], {"fmt": 1}, 0.1)                                           # a failed call applied nothing
    assert out[5].stats["tool_errors"] == 1


def test_reference_compat_reproduces_the_emerge_and_failed_call_flaws():
    """Outcomes built from ops alone (no call text): compat reads every op name, as the reference reads
    every op its heuristics find in a call's code, whether or not the call then ran or changed anything.
    Mutant: compat applies the fixed rules to ops (2.2, 2.2, 0.1)."""
    t = task(required=["rotate_90"])
    samples = [
        sample(True, [op("rotate_90"), op("resize")]),
        sample(True, [op("rotate_90"), op("contrast_up", changed=False)]),
        sample(False, [op("rotate_90", ok=False)], errors=1),
    ]
    out = score_group(t, samples, COMPAT)
    check(out[0], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1, "emerge": 1}, 2.4)  # any non-core name pays
    check(out[1], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1, "emerge": 1}, 2.4)
    check(out[2], {"fmt": 1, "mandatory": 1, "exact": 1}, 1.2)             # 0.1 + 1 + 0.1: the failed call counts


@pytest.mark.parametrize("box, iou_value, terms, total", [
    # answer box [0, 0, 10, 10] (area 100)
    ([0, 0, 10, 10], 1.0, {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2),        # 1 + .1 + 1 + .1
    # [0, 0, 10, 20]: intersection 100, union 200 -> IoU 0.5 -> mandatory 0.5 (>= gate, acc kept)
    ([0, 0, 10, 20], 0.5, {"acc": 1, "fmt": 1, "mandatory": 0.5, "exact": 1}, 1.7),      # 1 + .1 + .5 + .1
    # [0, 0, 10, 200]: intersection 100, union 2000 -> IoU 0.05 < gate 0.1 -> acc = 1 * 0.05
    ([0, 0, 10, 200], 0.05, {"acc": 0.05, "fmt": 1, "mandatory": 0.05, "exact": 1}, 0.3),  # .05 + .1 + .05 + .1
    # disjoint: IoU 0 -> a right answer from the wrong region earns nothing for accuracy
    ([20, 20, 30, 30], 0.0, {"acc": 0, "fmt": 1, "mandatory": 0, "exact": 1}, 0.2),      # .1 + .1
])
def test_crop_only(box, iou_value, terms, total):
    t = task(required=["crop"], answer_box=[0, 0, 10, 10])
    (out,) = score_group(t, [sample(True, [op("crop", box=box)])], FIXED)
    check(out, terms, total)
    assert out.stats["iou"] == pytest.approx(iou_value)


def test_crop_takes_the_best_of_several_boxes():
    t = task(required=["crop"], answer_box=[0, 0, 10, 10])
    # two calls, IoUs 0 and 0.5: the best counts; 2 calls = the free allowance, no usage penalty
    (out,) = score_group(t, [sample(True, [op("crop", box=[20, 20, 30, 30]), op("crop", box=[0, 0, 10, 20])],
                                    calls=2)], FIXED)
    check(out, {"acc": 1, "fmt": 1, "mandatory": 0.5, "exact": 1}, 1.7)


def test_crop_without_an_answer_box_counts_as_done():
    (out,) = score_group(task(required=["crop"]), [sample(True, [op("crop", box=[0, 0, 5, 5])])], FIXED)
    check(out, {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)


def test_rotation_and_crop_partial_credit():
    t = task(required=["rotate_90", "crop"], answer_box=[0, 0, 10, 10])
    samples = [
        # rotation done, crop IoU 0.5: mandatory = (1 + 0.5) / 2 = 0.75
        sample(True, [op("rotate_90"), op("crop", box=[0, 0, 10, 20])], calls=2),
        # no crop: mandatory = (1 + 0) / 2 = 0.5 >= gate; core used {rotate_90} != {rotate_90, crop}
        sample(True, [op("rotate_90")]),
        # crop only, disjoint: mandatory = (0 + 0) / 2 = 0 < gate -> acc 0
        sample(True, [op("crop", box=[50, 50, 60, 60])]),
    ]
    out = score_group(t, samples, FIXED)
    check(out[0], {"acc": 1, "fmt": 1, "mandatory": 0.75, "exact": 1}, 1.95)  # 1 + .1 + .75 + .1
    check(out[1], {"acc": 1, "fmt": 1, "mandatory": 0.5}, 1.6)               # 1 + .1 + .5
    check(out[2], {"fmt": 1}, 0.1)


def test_over_use():
    t = task(required=["rotate_90", "flip_horizontal", "crop"], answer_box=[0, 0, 10, 10])
    full = [op("rotate_90"), op("flip_horizontal"), op("crop", box=[0, 0, 10, 10])]
    out = score_group(t, [sample(True, full, calls=3), sample(True, full, calls=5)], FIXED)
    check(out[0], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)     # 3 calls = max(2, |E| = 3): free
    check(out[1], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1, "usage": 2}, 1.2)  # 5 - 3 = 2 -> 2.2 - 0.5*2


def test_spurious_flips():
    t = task(required=["crop"], answer_box=[0, 0, 10, 10])
    # flip_horizontal twice and flip_vertical once: 2 distinct orientation ops not required
    flips = [op("flip_horizontal"), op("flip_vertical"), op("flip_horizontal"), op("crop", box=[0, 0, 10, 10])]
    (out,) = score_group(t, [sample(True, flips, calls=2)], FIXED)
    # core used {flip_h, flip_v, crop} != {crop}: no exact. 1 + .1 + 1 - .5 * 2 = 1.1
    check(out, {"acc": 1, "fmt": 1, "mandatory": 1, "spurious": 2}, 1.1)


@pytest.mark.parametrize("correct, used_tool, expected", [
    # tools: 2 of 3 correct (2/3); no tools: 1 of 2 correct (1/2, fewer than 2 correct) -> gain 1/6,
    # paid to the correct tool users only
    ([True, True, False, False, True], [True, True, True, False, False], [1 / 6, 1 / 6, 0, 0, 0]),
    # no sample used a tool: nothing to compare
    ([True, False, True], [False, False, False], [0, 0, 0]),
    # every sample used a tool
    ([True, False], [True, True], [0, 0]),
    # two tool-free samples were correct: the tool was not necessary
    ([True, True, True, False], [True, False, False, True], [0, 0, 0, 0]),
    # all correct, one without tools: gain = 1 - 1 = 0
    ([True, True, True], [True, True, False], [0, 0, 0]),
    # tools worse than no tools: max(0, 0 - 1) = 0
    ([False, True], [True, False], [0, 0]),
])
def test_necessity_terms(correct, used_tool, expected):
    assert necessity_terms(correct, used_tool) == pytest.approx(expected)


def test_necessity_in_the_total():
    cfg = dataclasses.replace(FIXED, beta=0.2)
    t = task(required=[])
    samples = [sample(True, [op("sharpen", changed=False)]), sample(True, [op("sharpen", changed=False)]),
               sample(False, [op("sharpen", changed=False)]), sample(False), sample(True)]
    out = score_group(t, samples, cfg)
    check(out[0], {"acc": 1, "fmt": 1, "necessity": 1 / 6}, 1.1 + 0.2 / 6)    # 1 + .1 + .2 * (2/3 - 1/2)
    check(out[1], {"acc": 1, "fmt": 1, "necessity": 1 / 6}, 1.1 + 0.2 / 6)
    check(out[2], {"fmt": 1}, 0.1)
    check(out[3], {"fmt": 1}, 0.1)
    check(out[4], {"acc": 1, "fmt": 1}, 1.1)


def test_all_correct_without_tools():
    out = score_group(task(required=["rotate_90"]), [sample(True), sample(True)], dataclasses.replace(FIXED, beta=0.2))
    for b in out:
        check(b, {"acc": 1, "fmt": 1}, 1.1)  # no tool, no mandatory, no necessity (nobody used a tool)


def test_weights_scale_their_terms():
    # A sweep of alpha and gamma moves the total by exactly -delta * term.
    t = task(required=["rotate_90"])
    s = [sample(True, [op("rotate_90"), op("flip_vertical")], calls=4)]   # usage 4 - 2 = 2, spurious 0
    base = score_group(t, s, FIXED)[0]
    swept = score_group(t, s, dataclasses.replace(FIXED, alpha=0.5, gamma=0.25))[0]
    assert (base.terms, base.stats, base.correct) == (swept.terms, swept.stats, swept.correct)
    # mandatory 1, usage 2: alpha 1 -> 0.5 takes 0.5; gamma 0.5 -> 0.25 gives back 0.25 * 2
    assert swept.total - base.total == pytest.approx(-0.5 * 1 + 0.25 * 2)


def test_undecided_verdicts_are_decided_by_the_rules():
    t = task(answer="B", task_type="choice", choices=["cat", "dog"])
    out = score_group(t, [sample(None, answer="(B)"), sample(None, answer="cat"), sample(None, answer="")], FIXED)
    assert [b.correct for b in out] == [True, False, False]


def test_judge_failure_is_flagged():
    failed = dataclasses.replace(sample(False), judge_failed=True)
    out = score_group(task(), [failed, sample(True)], FIXED)
    assert [b.judge_failed for b in out] == [True, False]
    means = mean_breakdown(out)
    assert means["judge_failed"] == 0.5
    assert means["total"] == pytest.approx((0.1 + 1.1) / 2)


def test_unverified_ops_earn_nothing_in_the_fixed_reward():
    # The sandbox marks an op "unverified" when only the (untrusted) child's trace supports it.
    t = task(required=["rotate_90"])
    unverified = dataclasses.replace(op("rotate_90"), verified=False)
    out = score_group(t, [sample(True, [unverified]), sample(True, [op("rotate_90")])], FIXED)
    check(out[0], {"acc": 1, "fmt": 1}, 1.1)                                 # no mandatory, no exact credit
    check(out[1], {"acc": 1, "fmt": 1, "mandatory": 1, "exact": 1}, 2.2)


def test_outcome_keeps_the_unverified_mark():
    from reward_testlib import call, trajectory

    from cv_ray.reward.outcome import outcome_from_trajectory

    identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    traj = trajectory([None, None], [identity, None],
                      [call(0, [{"op": "rotate_90", "unverified": True}, {"op": "flip_vertical"}], output_index=1)],
                      "<answer>7</answer>")
    ops = outcome_from_trajectory(traj).ops
    assert [(o.name, o.verified) for o in ops] == [("rotate_90", False), ("flip_vertical", True)]
