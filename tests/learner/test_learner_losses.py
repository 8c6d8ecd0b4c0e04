"""Losses, advantages and schedules against hand-derived numbers (derivations in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cv_ray.learner.advantages import compute_advantages
from cv_ray.learner.checkpoint import DataPosition
from cv_ray.learner.losses import (
    AGGREGATIONS,
    PPOClip,
    RLTokens,
    build_rl_objective,
    kl_k1,
    kl_k3,
    sft_loss,
    tis_weights,
)
from cv_ray.learner.schedule import constant, cosine, warmup_steps_for

LN = math.log


def _objective(**overrides):
    params = {"policy_loss": "ppo_clip", "aggregation": "token_mean", "kl_estimator": "k3", "clip_low": 0.2,
              "clip_high": 0.28, "dual_clip": 10.0, "kl_coef": 0.0, "entropy_coef": 0.0, "tis_cap": 0.0}
    params.update(overrides)
    return build_rl_objective(**params)


# Five tokens of one sequence, ratio r = exp(logp - old) and advantage A (clip range [0.8, 1.28], c = 10):
#   a: A=+1, r=1.5  -> max(-1.5, -1.28) = -1.28   (clipped high)
#   b: A=-1, r=0.5  -> max( 0.5,  0.80) =  0.80   (clipped low)
#   c: A=+1, r=0.5  -> max(-0.5, -0.80) = -0.50   (not clipped: the min of PPO keeps the pessimistic side)
#   d: A=-1, r=20   -> max( 20,   1.28) =  20 -> dual clip min(20, -c*A = 10) = 10
#   e: A=-1, r=1.2  -> max( 1.2,  1.20) =  1.20  (inside the range)
RATIOS = [1.5, 0.5, 0.5, 20.0, 1.2]
ADVS = [1.0, -1.0, 1.0, -1.0, -1.0]


def _ppo_inputs():
    old = torch.full((1, 5), LN(0.1))
    logp = old + torch.tensor([[LN(r) for r in RATIOS]])
    return logp, old, torch.tensor([ADVS])


def test_ppo_clip_low_high_and_dual_clip_per_token():
    logp, old, adv = _ppo_inputs()
    loss, ind = PPOClip(clip_low=0.2, clip_high=0.28, dual_clip=10.0)(logp, old, adv)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, -0.5, 10.0, 1.2]]), atol=1e-5, rtol=0)
    assert ind["clip_frac_high"].tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]  # only a: d's clipped term (1.28) < 20
    assert ind["clip_frac_low"].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
    assert ind["dual_clip_frac"].tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]


def test_dual_clip_off_keeps_the_exploded_ratio():
    logp, old, adv = _ppo_inputs()
    loss, ind = PPOClip(clip_low=0.2, clip_high=0.28, dual_clip=0.0)(logp, old, adv)
    assert loss[0, 3].item() == pytest.approx(20.0, rel=1e-5)
    assert "dual_clip_frac" not in ind


def test_objective_token_mean_of_the_clipped_losses():
    # token mean of [-1.28, 0.8, -0.5, 10, 1.2] = 10.22 / 5 = 2.044; with one masked token (d) the
    # mean over the 4 others is (-1.28 + 0.8 - 0.5 + 1.2) / 4 = 0.055.
    logp, old, adv = _ppo_inputs()
    objective = _objective()
    mask = torch.ones(1, 5)
    loss, metrics = objective(RLTokens(logp, torch.zeros(1, 5), old, adv, mask), denominator=5)
    assert loss.item() == pytest.approx(2.044, abs=1e-5)
    assert metrics["clip_frac_high"] == pytest.approx(0.2) and metrics["dual_clip_frac"] == pytest.approx(0.2)
    mask[0, 3] = 0
    loss, _ = objective(RLTokens(logp, torch.zeros(1, 5), old, adv, mask), denominator=4)
    assert loss.item() == pytest.approx(0.055, abs=1e-5)


def test_token_mean_versus_sequence_mean():
    # values [[1,2,3,-],[10,-,-,-]] (- masked): token mean = (1+2+3+10)/4 = 4;
    # sequence mean = (mean(1,2,3)=2 + 10) / 2 = 6.
    values = torch.tensor([[1.0, 2.0, 3.0, 7.0], [10.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    token, seq = AGGREGATIONS["token_mean"], AGGREGATIONS["seq_mean"]
    assert token.count(mask) == 4 and seq.count(mask) == 2
    assert token.share(values, mask, token.count(mask)).item() == pytest.approx(4.0)
    assert seq.share(values, mask, seq.count(mask)).item() == pytest.approx(6.0)
    # Shares of two halves add up to the whole when divided by the whole batch's count.
    halves = sum(seq.share(values[i:i + 1], mask[i:i + 1], 2).item() for i in range(2))
    assert halves == pytest.approx(6.0)


def test_kl_estimators_k1_and_k3():
    # pi = 0.5, pi_ref = 0.25: k1 = ln(0.5/0.25) = ln 2 = 0.693147;
    # k3 = exp(d) - d - 1 with d = ln(0.25/0.5) = -ln 2: 0.5 + 0.693147 - 1 = 0.193147.
    logp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k3(logp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    # Same policy: both 0; k1 goes negative when pi < pi_ref while k3 stays >= 0 (0.25 vs 0.5: k1 = -ln 2,
    # k3 = 2 - ln 2 - 1 = 0.306853).
    assert kl_k3(ref, ref).item() == 0.0
    assert kl_k1(ref, logp).item() == pytest.approx(-0.693147, abs=1e-6)
    assert kl_k3(ref, logp).item() == pytest.approx(0.306853, abs=1e-6)


def test_kl_and_entropy_terms_enter_the_objective():
    # One token, ratio 1 and A = 0.5: pg = -0.5. kl k1 = ln 2 (as above), entropy H = 2.0.
    # loss = -0.5 + 0.1 * ln 2 - 0.01 * 2.0 = -0.5 + 0.0693147 - 0.02 = -0.4506853.
    logp = torch.tensor([[LN(0.5)]])
    tok = RLTokens(logprobs=logp, entropy=torch.tensor([[2.0]]), old_logprobs=logp.clone(),
                   advantages=torch.tensor([[0.5]]), mask=torch.ones(1, 1), ref_logprobs=torch.tensor([[LN(0.25)]]))
    loss, metrics = _objective(kl_estimator="k1", kl_coef=0.1, entropy_coef=0.01)(tok, denominator=1)
    assert loss.item() == pytest.approx(-0.4506853, abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.693147, abs=1e-6) and metrics["entropy"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _objective(kl_coef=0.1)(RLTokens(logp, tok.entropy, logp, tok.advantages, tok.mask), 1)


def test_truncated_importance_sampling_weights_and_loss():
    # learner 0.6 vs rollout 0.2: ratio 3 -> capped at 2; learner 0.1 vs rollout 0.2: 0.5.
    learner = torch.tensor([[LN(0.6), LN(0.1)]])
    rollout = torch.tensor([[LN(0.2), LN(0.2)]])
    torch.testing.assert_close(tis_weights(learner, rollout, cap=2.0), torch.tensor([[2.0, 0.5]]))
    # On-policy w.r.t. the learner (ratio 1), A = [1, 1]: pg = [-1, -1], weighted [-2, -0.5], token mean -1.25.
    tok = RLTokens(logprobs=learner.clone().requires_grad_(), entropy=torch.zeros(1, 2), old_logprobs=learner,
                   advantages=torch.ones(1, 2), mask=torch.ones(1, 2), rollout_logprobs=rollout)
    loss, metrics = _objective(tis_cap=2.0)(tok, denominator=2)
    assert loss.item() == pytest.approx(-1.25)
    assert metrics["tis_weight"] == pytest.approx(1.25) and metrics["tis_capped_frac"] == pytest.approx(0.5)
    # The weight carries no gradient: d loss / d logp_i = -A_i * w_i / 2 = [-1, -0.25].
    loss.backward()
    torch.testing.assert_close(tok.logprobs.grad, torch.tensor([[-1.0, -0.25]]))


def test_sft_masked_nll():
    # Trained tokens have p = 0.5 and 0.25: NLL = (ln 2 + ln 4) / 2 = 1.5 ln 2 = 1.039721.
    # The masked token's log-prob (-9) must not count.
    logp = torch.tensor([[0.0, LN(0.5), LN(0.25), -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, metrics = sft_loss(logp, torch.ones(1, 4), mask, denominator=2)
    assert loss.item() == pytest.approx(1.039721, abs=1e-6)
    assert metrics["entropy"] == pytest.approx(1.0)


def test_micro_batch_shares_sum_to_the_full_batch_gradient():
    """Splitting a batch into micro-batches (and ranks) with the global denominator gives the same gradient.

    A toy "policy": logp = w * x per token. Full-batch token mean of -A * logp vs the sum of
    per-micro-batch shares (each divided by the full batch's 5 tokens). The naive alternative, a mean
    per micro-batch, weights the 1-token micro-batch like the 4-token one and must differ.
    """
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0, -2.0, 0.5], [0.0, 3.0, 0.0, 0.0]])
    agg = AGGREGATIONS["token_mean"]

    def grad(loss_fn) -> float:
        w = torch.tensor(0.3, requires_grad=True)
        loss_fn(w).backward()
        return w.grad.item()

    total = agg.count(mask)
    full = grad(lambda w: agg.share(-adv * w * x, mask, total))
    split = grad(lambda w: sum(agg.share(-adv[i:i + 1] * w * x[i:i + 1], mask[i:i + 1], total) for i in range(2)))
    naive = grad(lambda w: sum(agg.share(-adv[i:i + 1] * w * x[i:i + 1], mask[i:i + 1], agg.count(mask[i:i + 1]))
                               for i in range(2)) / 2)
    # d/dw of -(1*2 - 2*3 + 0.5*0 + 3*5) / 4 = -11/4 (row 0 has 3 trained tokens: x = 2, 3, 0).
    assert full == pytest.approx(-11 / 4)
    assert split == pytest.approx(full)
    assert naive != pytest.approx(full)


def test_grpo_advantages_with_and_without_std():
    # group a: rewards [1, 0] -> mean 0.5, std 0.5 -> [1, -1]; without std: [0.5, -0.5].
    # group b: [1, 1] -> all equal -> [0, 0] (no signal).
    # group c: [0, 1, 2] -> mean 1, std sqrt(2/3) = 0.816497 -> [-1.224745, 0, 1.224745].
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 2.0]
    uids = ["a", "a", "b", "b", "c", "c", "c"]
    adv, metrics = compute_advantages("grpo", rewards, uids, std_norm=True)
    np.testing.assert_allclose(adv, [1, -1, 0, 0, -1.224745, 0, 1.224745], atol=1e-5)
    assert metrics["flat_group_frac"] == pytest.approx(1 / 3)
    adv, _ = compute_advantages("grpo", rewards, uids, std_norm=False)
    np.testing.assert_allclose(adv, [0.5, -0.5, 0, 0, -1, 0, 1], atol=1e-9)
    with pytest.raises(KeyError, match="grpo"):
        compute_advantages("ppo_gae", rewards, uids)
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("grpo", [float("nan")], ["a"])


def test_lr_schedules():
    # total 6 steps, warm-up ceil(0.3 * 6) = 2: steps 0, 1 -> 1/2, 2/2; then cosine over 4 steps with
    # progress 0, 1/4, 2/4, 3/4 -> 1, 0.853553, 0.5, 0.146447.
    warmup = warmup_steps_for(6, 0.3)
    assert warmup == 2
    got = [cosine(s, warmup, 6) for s in range(6)]
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447], atol=1e-6)
    assert [constant(s, warmup, 6) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert cosine(100, warmup, 6) == pytest.approx(0.0)


def test_data_position_rolls_over_at_the_epoch_boundary():
    pos = DataPosition(epoch=0, batch=1)
    assert pos.advance(3) == DataPosition(0, 2)
    assert pos.advance(3).advance(3) == DataPosition(1, 0)  # never (0, 3): that would resume with nothing left
    with pytest.raises(ValueError):
        pos.advance(0)
