"""Data parallelism and micro-batching do not change the update.

1 rank x the whole batch in one micro-batch (ZeRO-2) against 2 ranks x half the batch in micro-batches
of one sequence (ZeRO-3, parameters and gradients partitioned): the same loss, the same gradient norm
(so the gradient is scaled to the full-batch token mean, not averaged per micro-batch or per rank),
and the same weights after the step.
The samples have different numbers of trained tokens, so a per-micro-batch or per-rank mean would
weigh them differently and fail these checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from learner_samples import make_samples

from cv_ray.learner.config import LearnerConfig, LossConfig
from cv_ray.learner.group import LearnerGroup

pytestmark = pytest.mark.slow

LR = 1e-4


def _run(path, samples, rl_samples, **cfg_fields):
    # Gradient clipping off: the gradient norm is then what the optimizer sees.
    cfg = LearnerConfig(lr=LR, warmup_ratio=0.0, lr_schedule="constant", grad_clip=0.0,
                        loss=LossConfig(kl_coef=0.0), **cfg_fields)
    group = LearnerGroup(path, cfg, total_steps=10, seed=0)
    try:
        initial = ray.get(group.gather_weights())
        sft = group.sft_step(samples)
        after_sft = ray.get(group.gather_weights())
        rl = group.rl_step(rl_samples)
        after_rl = ray.get(group.gather_weights())
    finally:
        group.shutdown()
    return initial, (sft, after_sft), (rl, after_rl)


def test_two_ranks_with_micro_batches_update_like_one_rank_with_the_whole_batch(ray_local, tiny_qwen25, processor25):
    samples = make_samples(processor25, 4, seed=7)
    assert len({s.num_trained_tokens for s in samples}) > 1
    rl_samples = make_samples(processor25, 4, seed=8, rl=True)
    one = _run(tiny_qwen25, samples, rl_samples, num_ranks=1, zero_stage=2, micro_batch_size=4)
    two = _run(tiny_qwen25, samples, rl_samples, num_ranks=2, zero_stage=3, micro_batch_size=1)

    for name in one[0]:
        torch.testing.assert_close(one[0][name], two[0][name], atol=0, rtol=0)  # same start
    for (m1, w1), (m2, w2), prefix in ((one[1], two[1], "sft/"), (one[2], two[2], "rl/")):
        assert m2[prefix + "loss"] == pytest.approx(m1[prefix + "loss"], rel=1e-5)
        assert m2[prefix + "grad_norm"] == pytest.approx(m1[prefix + "grad_norm"], rel=1e-4)
        assert m1[prefix + "grad_norm"] > 0
        # Adam's first steps move each weight by about lr; the two runs agree far below that. Not to
        # lr / 100: Adam's step is lr * g / (|g| + 1e-8), and a weight whose gradient is a few 1e-9
        # (a sum that cancels) moves by a fraction of lr that its last float32 bits decide, which the
        # split into ranks and micro-batches changes (seen: lr / 65).
        worst = max(float((w1[n] - w2[n]).abs().max()) for n in w1)
        moved = max(float((w1[n] - one[0][n]).abs().max()) for n in w1)
        assert moved > LR / 2 and worst < LR / 20, (prefix, worst, moved)
    assert np.isfinite(one[2][0]["rl/pg_loss"])
