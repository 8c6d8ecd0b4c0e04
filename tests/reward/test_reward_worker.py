"""The reward actors on a local Ray cluster, with the judge served by a real local HTTP server."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image
from reward_testlib import call, task, text, trajectory

from cv_ray.geometry import identity
from cv_ray.reward import RewardGroup, RewardWorker, outcome_from_trajectory, score_group
from cv_ray.reward.config import JudgeConfig, RewardConfig

pytestmark = pytest.mark.slow


def _trajectories(answers, with_rotation=False):
    image = Image.new("RGB", (8, 4))
    calls = [call(0, [{"op": "rotate_90"}], output_index=1)] if with_rotation else []
    origin = [identity(), None] if with_rotation else [identity()]
    images = [image, image] if with_rotation else [image]
    return [trajectory(images, origin, calls, text(a)) for a in answers]


def test_reward_group_scores_groups_in_order_with_judge_and_math(ray_local, judge_server):
    server = judge_server("ok")
    cfg = RewardConfig(num_workers=2, cpus_per_worker=0.5,
                       judge=JudgeConfig(enabled=True, base_url=server.base_url, timeout_s=5.0, backoff_s=0.01))
    ocr = task(answer="stop", task_type="ocr", question="What does the sign say?", required=["rotate_90"])
    ocr = dataclasses.replace(ocr, images=[Image.new("RGB", (8, 4))])
    math_task = task(answer="0.5", task_type="math", question="x?")
    choice = task(answer="B", task_type="choice", choices=["cat", "dog"])
    groups = [
        (ocr, _trajectories(["STOP", "the sign says stop", "go"], with_rotation=True)),  # rule, judge 1, judge 0
        (math_task, _trajectories(["\\frac{1}{2}", "1/2", "\\frac{1}{3}"])),             # math-verify, rule, mismatch
        (choice, _trajectories(["(B)", "cat"])),
    ]
    group = RewardGroup(cfg)
    results, metrics = group.score(groups)

    verdicts = [[True, True, False], [True, True, False], [True, False]]
    assert [[b.correct for b in r] for r in results] == [[bool(v) for v in g] for g in verdicts]
    # the actors' totals equal the pure function's on the same verdicts
    for (t, trajs), breakdowns, group_verdicts in zip(groups, results, verdicts):
        outcomes = [dataclasses.replace(outcome_from_trajectory(tr), correct=v) for tr, v in zip(trajs, group_verdicts)]
        assert [b.total for b in breakdowns] == pytest.approx([b.total for b in score_group(t, outcomes, cfg)])
    # OCR with rotate_90 required and used: 1 + .1 + 1 + .1 = 2.2 for the two right answers
    assert [b.total for b in results[0]] == pytest.approx([2.2, 2.2, 1.2])
    assert server.requests == 2
    assert metrics["reward/judge/calls"] == 2 and metrics["reward/judge/failures"] == 0
    assert metrics["reward/verdict/rule/math_verify"] == 1  # \frac{1}{2} = 0.5, in the math-verify process
    assert metrics["reward/verdict/rule/mismatch"] == 2     # \frac{1}{3} (math-verify) and "cat" (choice)
    assert metrics["reward/verdict/rule/number"] == 1       # 1/2
    all_totals = [b.total for r in results for b in r]
    assert metrics["reward/total"] == pytest.approx(sum(all_totals) / len(all_totals))
    assert metrics["reward/correct"] == pytest.approx(5 / 8)

    # the same OCR group again: the worker that judged it answers from its cache
    _, again = group.score([groups[0]])
    assert server.requests == 2
    assert again["reward/judge/cache_hits"] == 2 and again["reward/judge/calls"] == 0


def test_reward_worker_flags_a_failing_judge(ray_local, judge_server):
    server = judge_server("error500")
    cfg = RewardConfig(judge=JudgeConfig(enabled=True, base_url=server.base_url, max_retries=1, backoff_s=0.01))
    worker = RewardWorker.remote(cfg)
    t = task(answer="stop", task_type="ocr")
    breakdowns = ray_local.get(worker.score.remote(t, _trajectories(["STOP", "maybe stop"])))
    assert [b.judge_failed for b in breakdowns] == [False, True]
    assert [b.correct for b in breakdowns] == [True, False]
    assert server.requests == 2  # one try and one retry, for the undecided answer only
    stats = ray_local.get(worker.stats.remote())
    assert stats["judge/failures"] == 1 and stats["verdict/judge/failed"] == 1


def test_reward_group_scores_with_its_configured_weights(ray_local):
    """Reward weights reach the actors. Mutant: the worker scores with ``RewardConfig()`` instead of its
    configured weights (totals 2.2, 1.1, 1.2).

    Weights: w_fmt 0.5, alpha 2, beta 0.5, exact 0.3, gamma 1. E = {rotate_90}, truth 7 (count rules).
    (a) rotates, answers 7: acc 1, fmt 1, mandatory 1, exact 1 -> 1 + .5 + 2 + .3 = 3.8
    (b) no tool, answers 7: 1 + .5 = 1.5
    (c) rotates, answers 8: .5 + 2 + .3 = 2.8
    Necessity: tool users 1/2 right, the tool-free one 1/1 -> max(0, .5 - 1) = 0.
    With reference_compat the calls' code ("...") reads as no op: (a) 1.5, (b) 1.5, (c) 0.5 (float32).
    """
    weights = {"w_fmt": 0.5, "alpha": 2.0, "beta": 0.5, "exact_bonus": 0.3, "gamma": 1.0, "cpus_per_worker": 0.25}
    t = task(answer="7", task_type="count", required=["rotate_90"])
    rotated, plain, wrong = (_trajectories(["7"], with_rotation=True)[0], _trajectories(["7"])[0],
                             _trajectories(["8"], with_rotation=True)[0])
    (fixed,), _ = RewardGroup(RewardConfig(**weights)).score([(t, [rotated, plain, wrong])])
    assert [b.total for b in fixed] == pytest.approx([3.8, 1.5, 2.8])
    (compat,), _ = RewardGroup(RewardConfig(reference_compat=True, **weights)).score([(t, [rotated, plain, wrong])])
    assert [b.total for b in compat] == [1.5, 1.5, 0.5]
