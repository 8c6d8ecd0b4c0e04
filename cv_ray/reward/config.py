"""Configuration of the reward (Hydra group `reward`).

Weights follow the reference recipe (see docs/reward.md); the total is
w_acc*R_acc + w_fmt*R_fmt + alpha*R_mandatory + beta*R_necessity + exact_bonus*R_exact
+ emerge_bonus*R_emerge - gamma*(C_usage + R_spurious).
Sweep from the command line, e.g. `reward.alpha=0.5,1.0 reward.gamma=0.25,0.5`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.errors import ConfigError, require_at_least, require_positive


@dataclass
class JudgeConfig:
    enabled: bool = False
    """Ask an LLM judge (OpenAI-compatible chat API) when the answer rules fail. With
    reward.reference_compat it is also asked, as the reference asks, which ops a call used when the
    code's text shows none."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """Server root, e.g. a vLLM or SGLang server's `/v1`."""
    model: str = "judge"
    """Model name sent in the request."""
    api_key_env: str = "CV_RAY_JUDGE_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in config)."""
    timeout_s: float = 30.0
    """Per-request timeout."""
    max_retries: int = 2
    """Retries after a failed request, with exponential backoff."""
    backoff_s: float = 0.5
    """First backoff delay; doubles after each retry."""
    max_concurrency: int = 16
    """Requests in flight at once per reward worker."""


@dataclass
class RewardConfig:
    w_acc: float = 1.0
    """Weight of the answer accuracy term R_acc."""
    w_fmt: float = 0.1
    """Weight of the format term R_fmt."""
    alpha: float = 1.0
    """Weight of R_mandatory (required ops used; crop scored by IoU with the answer box)."""
    beta: float = 0.0
    """Weight of the group necessity term R_necessity (off in the reference recipe)."""
    exact_bonus: float = 0.1
    """R_exact: paid when the core ops used equal the core ops required (non-empty)."""
    emerge_bonus: float = 0.2
    """R_emerge: paid when correct and a non-core op changed the image."""
    gamma: float = 0.5
    """Weight of the penalties C_usage (too many calls) and R_spurious (unneeded rotations/flips)."""
    free_calls: int = 2
    """Calls allowed before C_usage starts counting: max(free_calls, |required ops|)."""
    crop_gate: float = 0.1
    """When crop is required and R_mandatory is below this, R_acc is multiplied by R_mandatory."""
    reference_compat: bool = False
    """Score exactly as the reference release, flaws included (ops guessed from the code's text, crop
    boxes in the wrong frame, its answer and format rules, float32 totals), for comparison runs.
    Every departure of the default is listed in docs/reward.md."""
    math_timeout_s: int = 2
    """Seconds math-verify may spend parsing or comparing one answer (whole seconds: SIGALRM)."""
    num_workers: int = 1
    """RewardWorker actors."""
    cpus_per_worker: float = 1.0
    """Ray CPUs reserved by each RewardWorker."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The optional LLM judge, asked only when the answer rules cannot decide."""

    def validate(self, prefix: str = "reward") -> None:
        for name in ("w_acc", "w_fmt", "alpha", "beta", "exact_bonus", "emerge_bonus", "gamma"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{prefix}.{name}", f"got {value}", "weights are non-negative; "
                                  "penalties are subtracted by the formula itself")
        if not 0 <= self.crop_gate <= 1:
            raise ConfigError(f"{prefix}.crop_gate", f"got {self.crop_gate}", "use a value in [0, 1]")
        if self.free_calls < 0:
            raise ConfigError(f"{prefix}.free_calls", f"got {self.free_calls}", "use 0 or more")
        if self.math_timeout_s < 1:
            raise ConfigError(f"{prefix}.math_timeout_s", f"got {self.math_timeout_s}",
                              "use at least 1 (math-verify's timeout counts whole seconds)")
        require_positive(self, prefix, "cpus_per_worker")
        require_at_least(self, prefix, "num_workers", 1)
        if self.judge.timeout_s <= 0:
            raise ConfigError(f"{prefix}.judge.timeout_s", f"got {self.judge.timeout_s}", "use a positive number")
        if self.judge.max_retries < 0:
            raise ConfigError(f"{prefix}.judge.max_retries", f"got {self.judge.max_retries}", "use 0 or more")
        if self.judge.backoff_s < 0:
            raise ConfigError(f"{prefix}.judge.backoff_s", f"got {self.judge.backoff_s}", "use 0 or more")
        if self.judge.enabled and not self.judge.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}.judge.base_url", f"got {self.judge.base_url!r}",
                              "give the server root with its scheme, e.g. http://127.0.0.1:8000/v1")
        if self.judge.max_concurrency < 1:
            raise ConfigError(f"{prefix}.judge.max_concurrency", f"got {self.judge.max_concurrency}", "use at least 1")
