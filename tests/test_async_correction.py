"""The off-policy correction of the asynchronous loop (decoupled PPO), against hand-derived numbers.

Three policies per token: the behaviour policy mu that sampled it (the rollout log-probs, possibly a
few versions old), the proximal policy pi_prox (the learner at the start of the step's updates) and
the current policy pi (the learner during an update). The loss per token is
``w * max(-A r, -A clip(r, 1 - 0.2, 1 + 0.28))`` with ``r = pi / pi_prox`` and the capped behaviour
weight ``w = min(pi_prox / mu, cap)`` (no gradient through ``w``): the trust region is anchored at
the proximal policy, the weight corrects for who sampled.
"""

from __future__ import annotations

import math

import pytest
import torch

from cv_ray.config import Config
from cv_ray.driver import ASYNC_TIS_CAP, rl_learner_config, streaming
from cv_ray.learner.losses import RLTokens, build_rl_objective

LN = math.log


def objective(tis_cap: float):
    return build_rl_objective("ppo_clip", "token_mean", "k3", clip_low=0.2, clip_high=0.28, dual_clip=10.0,
                              kl_coef=0.0, entropy_coef=0.0, tis_cap=tis_cap)


def test_decoupled_ppo_hand_derived_loss_gradient_and_weights():
    """A second update of a step on a batch sampled one version ago (cap 2, clip [0.8, 1.28]):

        token  A    mu    pi_prox  pi     r = pi/pi_prox   PPO term                 w = min(pi_prox/mu, 2)
        a     +1   0.2   0.4      0.6    1.5 (clipped)    max(-1.5, -1.28) = -1.28  2 (capped)
        b     +1   0.5   0.25     0.3    1.2              max(-1.2, -1.2)  = -1.2   0.5
        c     -1   0.1   0.5      0.45   0.9              max( 0.9,  0.9)  =  0.9   2 (5, capped)

    loss = (2 * -1.28 + 0.5 * -1.2 + 2 * 0.9) / 3 = -1.36 / 3; d loss / d log pi = -A w r / 3 where the
    term is not clipped: a 0, b -0.5 * 1.2 / 3 = -0.2, c 2 * 0.9 / 3 = 0.6.
    Mutants: the ratio taken against mu (b: max(-0.6, -0.8) = -0.6; c: 4.5); the weight taken from the
    current policy (b: min(0.3 / 0.5, 2) = 0.6); the weight not capped (c: 5).
    """
    mu = torch.tensor([[LN(0.2), LN(0.5), LN(0.1)]])
    prox = torch.tensor([[LN(0.4), LN(0.25), LN(0.5)]])
    pi = torch.tensor([[LN(0.6), LN(0.3), LN(0.45)]], requires_grad=True)
    tok = RLTokens(logprobs=pi, entropy=torch.zeros(1, 3), old_logprobs=prox, advantages=torch.tensor([[1.0, 1.0, -1.0]]),
                   mask=torch.ones(1, 3), rollout_logprobs=mu)
    loss, metrics = objective(tis_cap=2.0)(tok, denominator=3)
    assert loss.item() == pytest.approx(-1.36 / 3, abs=1e-6)
    assert metrics["tis_weight"] == pytest.approx(4.5 / 3, abs=1e-6)  # (2 + 0.5 + 2) / 3
    assert metrics["tis_capped_frac"] == pytest.approx(2 / 3, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(pi.grad, torch.tensor([[0.0, -0.2, 0.6]]))


def test_on_policy_the_correction_is_exactly_todays_loss():
    """At staleness 0 the sampler is the proximal policy (mu == pi_prox): every weight is exp(0) = 1, and
    the decoupled loss equals the loss the synchronous loop uses (tis_cap 0, ratio against the rollout
    log-probs), value and gradient, bit for bit. Mutant: the weight taken from the current policy."""
    generator = torch.Generator().manual_seed(0)
    sampled = torch.randn(4, 7, generator=generator) - 2.0
    current = sampled + 0.3 * torch.randn(4, 7, generator=generator)
    advantages = torch.randn(4, 7, generator=generator)
    mask = (torch.rand(4, 7, generator=generator) > 0.3).float()

    def run(tis_cap: float, old: torch.Tensor):
        pi = current.clone().requires_grad_()
        tok = RLTokens(logprobs=pi, entropy=torch.zeros(4, 7), old_logprobs=old, advantages=advantages, mask=mask,
                       rollout_logprobs=sampled)
        loss, _ = objective(tis_cap)(tok, denominator=float(mask.sum()))
        loss.backward()
        return loss.detach(), pi.grad

    today = run(0.0, old=sampled)
    decoupled = run(ASYNC_TIS_CAP, old=sampled.clone())
    assert torch.equal(today[0], decoupled[0]) and torch.equal(today[1], decoupled[1])


def test_the_rl_stage_turns_the_correction_on_only_when_batches_may_be_off_policy():
    """k = 0 keeps the learner config object itself (today's loss); k >= 1 with no cap set gets the
    documented default; a cap the user set is kept; the group filter alone streams but stays on-policy.
    Mutant: the default cap applied at k = 0 as well."""
    cfg = Config()
    assert not streaming(cfg) and rl_learner_config(cfg) is cfg.learner
    cfg.trainer.rl.max_staleness = 1
    assert streaming(cfg) and rl_learner_config(cfg).loss.tis_cap == ASYNC_TIS_CAP
    assert cfg.learner.loss.tis_cap == 0.0  # the run's config itself is not mutated
    cfg.learner.loss.tis_cap = 3.0
    assert rl_learner_config(cfg).loss.tis_cap == 3.0
    cfg = Config()
    cfg.trainer.rl.filter_flat_groups = True
    assert streaming(cfg) and rl_learner_config(cfg) is cfg.learner
