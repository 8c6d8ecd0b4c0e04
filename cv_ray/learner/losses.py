"""Policy-gradient and SFT losses as pure functions of tensors (no Ray, no I/O, no config objects).

Shapes: every per-token tensor is ``[B, T]`` (sequences x positions), aligned with the input ids:
position ``t`` holds the log-prob of token ``t`` given tokens ``< t`` (position 0 is never trained).
``mask`` is 1.0 on tokens that are trained and 0.0 elsewhere (prompt, tool responses, padding).

Global normalisation. A mini-batch is split across ranks and, on each rank, into micro-batches;
gradients are summed over micro-batches and averaged over ranks. So every function here returns the
micro-batch's *additive share* of the mini-batch value: it divides by a ``denominator`` computed over
the whole mini-batch (all ranks, all micro-batches) by :meth:`Aggregation.count`. Summing the shares
gives exactly the full-batch token-mean (or sequence-mean), and so does the summed gradient; metrics
are shares of the same kind, so they add up across micro-batches and ranks as well.

Variants register by name: :data:`AGGREGATIONS`, :data:`POLICY_LOSSES`, :data:`KL_ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

# Bounds on log-ratios before exponentiating: a token whose probability moved by e^20 is already
# far outside any clip range, and exp() of larger values overflows float32 in the gradient.
_LOG_RATIO_BOUND = 20.0


# --------------------------------------------------------------------------------------------
# Aggregation: how per-token values become one number
# --------------------------------------------------------------------------------------------


class Aggregation(Protocol):
    def count(self, mask: torch.Tensor) -> float:
        """This part's contribution to the mini-batch denominator. mask: ``[B, T]``."""

    def share(self, values: torch.Tensor, mask: torch.Tensor, denominator: float) -> torch.Tensor:
        """This part's additive share of the mini-batch aggregate. values, mask: ``[B, T]``; scalar."""


class TokenMean:
    """Mean over every trained token of the mini-batch (long sequences weigh more): ``sum(v*m) / N_tokens``."""

    def count(self, mask: torch.Tensor) -> float:
        return float(mask.sum())

    def share(self, values: torch.Tensor, mask: torch.Tensor, denominator: float) -> torch.Tensor:
        return (values * mask).sum() / denominator


class SeqMean:
    """Mean per sequence, then over the sequences that have trained tokens: ``sum_i mean_t(v_i) / N_seq``."""

    def count(self, mask: torch.Tensor) -> float:
        return float((mask.sum(-1) > 0).sum())

    def share(self, values: torch.Tensor, mask: torch.Tensor, denominator: float) -> torch.Tensor:
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / denominator


AGGREGATIONS: dict[str, Aggregation] = {"token_mean": TokenMean(), "seq_mean": SeqMean()}


# --------------------------------------------------------------------------------------------
# Policy losses: per-token surrogate losses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOClip:
    """PPO's clipped surrogate with clip-higher and dual clip.

    With ``r = exp(logp - old_logp)`` and advantage ``A`` (per token):
    ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; for ``A < 0`` and ``dual_clip = c > 1``,
    ``l = min(l, -c A)`` bounds the loss of a token whose ratio exploded (dual clip, Ye et al. 2020).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 0.0

    def __call__(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logp, old_logp, advantages: ``[B, T]``. Returns (per-token loss ``[B, T]``, per-token indicators)."""
        log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        ratio = torch.exp(log_ratio)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
        loss = torch.maximum(unclipped, clipped)
        took_clip = (clipped > unclipped).float()
        indicators = {
            "clip_frac_low": took_clip * (ratio < 1.0).float(),
            "clip_frac_high": took_clip * (ratio > 1.0).float(),
            "ratio": ratio.detach(),
        }
        if self.dual_clip > 0:
            bound = -advantages * self.dual_clip
            dual = (advantages < 0) & (loss > bound)
            loss = torch.where(dual, bound, loss)
            indicators["dual_clip_frac"] = dual.float()
        return loss, indicators


POLICY_LOSSES: dict[str, type] = {"ppo_clip": PPOClip}


# --------------------------------------------------------------------------------------------
# KL estimators: per-token estimates of KL(pi || pi_ref) from samples of pi
# --------------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k1 = log pi - log pi_ref``: unbiased, high variance, can be negative per token. ``[B, T]``."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(d) - d - 1`` with ``d = log pi_ref - log pi``: unbiased, low variance, >= 0 (Schulman). ``[B, T]``."""
    d = (ref_logp - logp).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# --------------------------------------------------------------------------------------------
# Truncated importance sampling (rollout engine vs learner)
# --------------------------------------------------------------------------------------------


def tis_weights(learner_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(pi_learner / pi_rollout, cap)`` per token, without gradient. ``[B, T]``.

    The rollout engine (vLLM, bf16 kernels) and the learner disagree slightly on the same policy;
    weighting each token's loss by this capped ratio corrects the sampling distribution (Yao et al.
    2025, "truncated importance sampling") while the cap bounds the variance.
    """
    log_ratio = (learner_logp - rollout_logp).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.exp(log_ratio).clamp(max=cap).detach()


# --------------------------------------------------------------------------------------------
# The RL objective and the SFT loss
# --------------------------------------------------------------------------------------------


@dataclass
class RLTokens:
    """The per-token tensors of one micro-batch, all ``[B, T]``."""

    logprobs: torch.Tensor
    """Current policy (with gradient)."""
    entropy: torch.Tensor
    """Entropy of the current policy's token distribution (with gradient)."""
    old_logprobs: torch.Tensor
    """The policy that PPO's ratio is taken against (no gradient)."""
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    """Reference policy; required when the KL term is on."""
    rollout_logprobs: torch.Tensor | None = None
    """The rollout engine's log-probs; required when truncated importance sampling is on."""


@dataclass(frozen=True)
class RLObjective:
    """``loss = agg(w * l_pg) + kl_coef * agg(kl) - entropy_coef * agg(H)`` over trained tokens.

    ``w`` is the truncated importance weight (1 when ``tis_cap == 0``), ``l_pg`` the registered
    policy loss, ``kl`` the registered estimator against the reference, ``H`` the token entropy,
    ``agg`` the registered aggregation's share (see the module docstring).
    """

    policy_loss: PPOClip
    aggregation: Aggregation
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = kl_k3
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float = 0.0

    def __call__(self, tok: RLTokens, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (this micro-batch's share of the loss: a scalar with gradient, additive metrics)."""
        agg, mask = self.aggregation, tok.mask

        def share(values: torch.Tensor) -> torch.Tensor:
            return agg.share(values, mask, denominator)

        pg, indicators = self.policy_loss(tok.logprobs, tok.old_logprobs, tok.advantages)
        metrics: dict[str, float] = {}
        if self.tis_cap > 0:
            if tok.rollout_logprobs is None:
                raise ValueError("tis_cap > 0 needs the rollout engine's log-probs (rollout_logprobs)")
            weights = tis_weights(tok.old_logprobs, tok.rollout_logprobs, self.tis_cap)
            pg = pg * weights
            metrics["tis_weight"] = float(share(weights))
            metrics["tis_capped_frac"] = float(share((weights >= self.tis_cap).float()))
        pg_loss = share(pg)
        entropy = share(tok.entropy)
        loss = pg_loss - self.entropy_coef * entropy if self.entropy_coef else pg_loss
        if self.kl_coef > 0:
            if tok.ref_logprobs is None:
                raise ValueError("kl_coef > 0 needs the reference model's log-probs (ref_logprobs)")
            kl = share(self.kl_estimator(tok.logprobs, tok.ref_logprobs))
            loss = loss + self.kl_coef * kl
            metrics["kl"] = float(kl.detach())
        metrics.update(
            loss=float(loss.detach()),
            pg_loss=float(pg_loss.detach()),
            entropy=float(entropy.detach()),
            # Divergence of the current policy from the one that sampled (0 on the first on-policy pass).
            approx_kl_old=float(share(kl_k3(tok.logprobs.detach(), tok.old_logprobs))),
        )
        for name, values in indicators.items():
            metrics[name] = float(share(values))
        return loss, metrics


def build_rl_objective(policy_loss: str, aggregation: str, kl_estimator: str, *, clip_low: float,
                       clip_high: float, dual_clip: float, kl_coef: float, entropy_coef: float,
                       tis_cap: float) -> RLObjective:
    """Look the named variants up in the registries (unknown names raise KeyError with the choices)."""
    for kind, name, registry in (("policy loss", policy_loss, POLICY_LOSSES),
                                 ("aggregation", aggregation, AGGREGATIONS),
                                 ("KL estimator", kl_estimator, KL_ESTIMATORS)):
        if name not in registry:
            raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(registry)}")
    return RLObjective(
        policy_loss=POLICY_LOSSES[policy_loss](clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip),
        aggregation=AGGREGATIONS[aggregation],
        kl_estimator=KL_ESTIMATORS[kl_estimator],
        kl_coef=kl_coef,
        entropy_coef=entropy_coef,
        tis_cap=tis_cap,
    )


def sft_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, denominator: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked negative log-likelihood: ``-sum(logp * mask) / denominator`` (token mean over the mini-batch).

    logprobs, entropy, mask: ``[B, T]``; ``mask`` is 1 on assistant tokens only. ``denominator`` is the
    mini-batch's trained-token count. Returns (this micro-batch's share of the loss, additive metrics).
    """
    nll = -(logprobs * mask).sum() / denominator
    metrics = {
        "loss": float(nll.detach()),
        "entropy": float((entropy.detach() * mask).sum() / denominator),
    }
    return nll, metrics
