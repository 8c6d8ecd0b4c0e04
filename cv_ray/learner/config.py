"""Configuration of the DeepSpeed learner group (Hydra group `learner`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.errors import ConfigError


@dataclass
class LossConfig:
    policy_loss: str = "ppo_clip"
    """Registered policy-loss name (see cv_ray.learner.losses)."""
    advantage: str = "grpo"
    """Registered advantage estimator (see cv_ray.learner.advantages)."""
    adv_std_norm: bool = True
    """Divide group-centred rewards by the group's standard deviation."""
    aggregation: str = "token_mean"
    """`token_mean` (over all unmasked tokens of the batch) or `seq_mean` (mean per sequence, then over sequences)."""
    clip_low: float = 0.2
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
    """Truncated importance sampling cap between rollout and learner log-probs (0 disables)."""


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    """DeepSpeed ranks (Ray actors); one torch.distributed group (gloo on CPU, NCCL on GPU)."""
    gpus_per_rank: float = 0.0
    cpus_per_rank: float = 1.0
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"
    """`cosine` or `constant` after warm-up."""
    grad_clip: float = 1.0
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    mini_batch_size: int = 0
    """Sequences per optimizer step across ranks (0: the whole RL batch in one step)."""
    ppo_epochs: int = 1
    gradient_checkpointing: bool = False
    freeze_vision: bool = True
    """Freeze the vision tower and projector (the reference recipe does for SFT)."""
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `bf16` or `fp32`."""
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, prefix: str = "learner") -> None:
        if self.num_ranks < 1:
            raise ConfigError(f"{prefix}.num_ranks", f"got {self.num_ranks}", "use at least 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage", f"got {self.zero_stage}", "use 0, 1, 2 or 3")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", f"got {self.lr}", "use a positive learning rate")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{prefix}.warmup_ratio", f"got {self.warmup_ratio}", "use a value in [0, 1)")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"{prefix}.lr_schedule", f"got {self.lr_schedule!r}", "use `cosine` or `constant`")
        if self.micro_batch_size < 1:
            raise ConfigError(f"{prefix}.micro_batch_size", f"got {self.micro_batch_size}", "use at least 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"{prefix}.precision", f"got {self.precision!r}", "use `auto`, `bf16` or `fp32`")
        loss = self.loss
        if loss.aggregation not in ("token_mean", "seq_mean"):
            raise ConfigError(f"{prefix}.loss.aggregation", f"got {loss.aggregation!r}", "use `token_mean` or `seq_mean`")
        if loss.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"{prefix}.loss.kl_estimator", f"got {loss.kl_estimator!r}", "use `k1` or `k3`")
        if not (0 <= loss.clip_low < 1 and loss.clip_high >= 0):
            raise ConfigError(f"{prefix}.loss.clip_low", f"clip range [{loss.clip_low}, {loss.clip_high}]",
                              "use 0 <= clip_low < 1 and clip_high >= 0")
        if loss.dual_clip and loss.dual_clip <= 1:
            raise ConfigError(f"{prefix}.loss.dual_clip", f"got {loss.dual_clip}", "use 0 (off) or a value > 1")
