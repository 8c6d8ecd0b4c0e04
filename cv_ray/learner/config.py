"""Configuration of the DeepSpeed learner group (Hydra group `learner`).

Variant names (`policy_loss`, `aggregation`, `kl_estimator`, `lr_schedule`) are checked against the
registries of the pure-math modules (cv_ray.learner.losses / schedule). The learner scores tokens at
the temperature they were sampled with, which the driver passes (`rollout.temperature`); the
advantage estimator is the driver's (`trainer.rl.advantage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.errors import ConfigError, require_at_least


@dataclass
class LossConfig:
    policy_loss: str = "ppo_clip"
    """Registered policy-loss name (see cv_ray.learner.losses)."""
    aggregation: str = "token_mean"
    """`token_mean` (over all unmasked tokens of the batch) or `seq_mean` (mean per sequence, then over sequences)."""
    clip_low: float = 0.2
    """Lower PPO clip: the ratio may fall to 1 - clip_low."""
    clip_high: float = 0.28
    """Clip-higher: ratio is clipped to [1 - clip_low, 1 + clip_high]."""
    dual_clip: float = 10.0
    """Dual-clip constant c for negative advantages (0 disables)."""
    kl_coef: float = 0.001
    """Weight of the KL loss against the reference model (0 disables the reference)."""
    kl_estimator: str = "k3"
    """`k1` (log-ratio) or `k3` (low-variance)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    tis_cap: float = 0.0
    """Truncated importance sampling cap between rollout and learner log-probs (0 disables). When on,
    PPO's ratio is taken against the learner's own pre-update log-probs and each token's loss is
    weighted by min(pi_learner / pi_rollout, tis_cap); when off, against the rollout log-probs."""


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    """DeepSpeed ranks (Ray actors); one torch.distributed group (gloo on CPU, NCCL on GPU)."""
    gpus_per_rank: float = 0.0
    """GPUs per rank (1 on GPU nodes; 0 on CPU)."""
    cpus_per_rank: float = 1.0
    """Ray CPUs reserved by each rank; on CPU also the rank's torch threads."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    lr: float = 1e-6
    """Peak RL learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Share of the optimizer steps spent warming the learning rate up linearly from 0."""
    lr_schedule: str = "cosine"
    """`cosine` or `constant` after warm-up."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: off)."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    mini_batch_size: int = 0
    """Sequences per optimizer step across ranks (0: the whole RL batch in one step)."""
    ppo_epochs: int = 1
    """Passes over each RL batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    freeze_vision: bool = True
    """Freeze the vision tower and projector (`model.visual`, its merger included; the reference
    recipe does for SFT)."""
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bf16` or `fp32`."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel (`sdpa`, `eager`, `flash_attention_2` where installed)."""
    weight_bucket_mb: int = 512
    """Weight push / export: ZeRO-3 gathers parameters in buckets of at most this many MiB."""
    logprob_chunk_tokens: int = 1024
    """Token log-probs and entropies are computed from the final hidden states through `lm_head` this
    many positions at a time, so no `[T, vocab]` logits exist in the forward or backward pass: peak
    memory about two float32 `[chunk, vocab]` blocks (1024 x 151,936: 0.6 GB each) instead of
    several `T x vocab` copies. 0: the model's full logits and one whole-row log-softmax (the
    reference computation; runs out of memory on long responses)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The registered losses and their coefficients."""

    def validate(self, prefix: str = "learner") -> None:
        require_at_least(self, prefix, "num_ranks", 1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage", f"got {self.zero_stage}", "use 0, 1, 2 or 3")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", f"got {self.lr}", "use a positive learning rate")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{prefix}.warmup_ratio", f"got {self.warmup_ratio}", "use a value in [0, 1)")
        # Registries live with the math; imported here so the config module itself stays light.
        from cv_ray.learner.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
        from cv_ray.learner.schedule import LR_SCHEDULES

        def check_name(key: str, value: str, registry) -> None:
            if value not in registry:
                raise ConfigError(f"{prefix}.{key}", f"got {value!r}", f"use one of {', '.join(sorted(registry))}")

        check_name("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        require_at_least(self, prefix, "micro_batch_size", 1)
        if self.mini_batch_size < 0:
            raise ConfigError(f"{prefix}.mini_batch_size", f"got {self.mini_batch_size}", "use 0 (whole batch) or more")
        require_at_least(self, prefix, "ppo_epochs", 1)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"{prefix}.precision", f"got {self.precision!r}", "use `auto`, `bf16` or `fp32`")
        require_at_least(self, prefix, "weight_bucket_mb", 1)
        if self.logprob_chunk_tokens < 0:
            raise ConfigError(f"{prefix}.logprob_chunk_tokens", f"got {self.logprob_chunk_tokens}",
                              "use a positive chunk (positions per lm_head block, e.g. 1024) or 0 for no chunking")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip", f"got {self.grad_clip}", "use 0 (off) or a positive norm")
        loss = self.loss
        check_name("loss.policy_loss", loss.policy_loss, POLICY_LOSSES)
        check_name("loss.aggregation", loss.aggregation, AGGREGATIONS)
        check_name("loss.kl_estimator", loss.kl_estimator, KL_ESTIMATORS)
        if loss.kl_coef < 0 or loss.entropy_coef < 0 or loss.tis_cap < 0:
            raise ConfigError(f"{prefix}.loss", f"kl_coef={loss.kl_coef}, entropy_coef={loss.entropy_coef}, "
                              f"tis_cap={loss.tis_cap}", "use non-negative values (0 disables each)")
        if 0 < loss.tis_cap < 1:
            raise ConfigError(f"{prefix}.loss.tis_cap", f"got {loss.tis_cap}", "use 0 (off) or a cap >= 1, e.g. 2")
        if not (0 <= loss.clip_low < 1 and loss.clip_high >= 0):
            raise ConfigError(f"{prefix}.loss.clip_low", f"clip range [{loss.clip_low}, {loss.clip_high}]",
                              "use 0 <= clip_low < 1 and clip_high >= 0")
        if loss.dual_clip and loss.dual_clip <= 1:
            raise ConfigError(f"{prefix}.loss.dual_clip", f"got {loss.dual_clip}", "use 0 (off) or a value > 1")
