"""Configuration of the sandbox executors (Hydra group `sandbox`)."""

from __future__ import annotations

from dataclasses import dataclass

from cv_ray.errors import ConfigError, require_at_least, require_positive


@dataclass
class SandboxConfig:
    num_executors: int = 2
    """SandboxExecutor actors; scale these independently of GPUs (they need CPUs only)."""
    cpus_per_executor: float = 1.0
    """Ray CPUs reserved per executor actor."""
    workers_per_executor: int = 1
    """Warm zygote processes per executor (one per core given to sandboxing is a good default)."""
    timeout_s: float = 5.0
    """Wall-clock deadline per call, enforced with SIGKILL."""
    memory_mb: int = 1024
    """Address-space budget per call on top of the zygote's own size."""
    max_code_chars: int = 2048
    """Longer code is refused with an error the model can read (the reference's limit)."""
    max_output_pixels: int = 4096 * 4096
    """Result images larger than this are refused."""
    max_stdout_chars: int = 2000
    """Printed output returned to the model is cut to this length."""
    session: str = "call"
    """`call`: a fresh child per call. `trajectory`: one child per trajectory keeps variables."""
    allow_degraded: bool = False
    """Run even when an isolation layer is missing on this host (start-up names what is missing)."""
    session_idle_s: float = 300.0
    """`trajectory` sessions: a session child unused this long is killed (its variables are lost)."""
    max_sessions_per_worker: int = 64
    """`trajectory` sessions: beyond this many live sessions on a worker the least recently used is ended."""
    recycle_after: int = 2000
    """Restart a worker's zygote after this many calls (when it holds no live session)."""
    actor_retries: int = 2
    """SandboxGroup: how many times a call whose executor actor died is retried on another actor."""
    verify_budget_s: float = 2.0
    """Wall-clock budget of the parent's check of one call's ops against its pixels (beside a work
    budget proportional to the images' size); past it the call's ops are reported unverified."""

    def validate(self, prefix: str = "sandbox") -> None:
        require_at_least(self, prefix, "num_executors", 1)
        require_at_least(self, prefix, "workers_per_executor", 1)
        require_positive(self, prefix, "cpus_per_executor")
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.timeout_s", f"got {self.timeout_s}", "use a positive number of seconds")
        if self.memory_mb < 64:
            raise ConfigError(f"{prefix}.memory_mb", f"got {self.memory_mb}", "use at least 64 (MB)")
        if self.session not in ("call", "trajectory"):
            raise ConfigError(f"{prefix}.session", f"got {self.session!r}", "use `call` or `trajectory`")
        if self.session_idle_s <= 0:
            raise ConfigError(f"{prefix}.session_idle_s", f"got {self.session_idle_s}", "use a positive number of seconds")
        if self.max_sessions_per_worker < 1:
            raise ConfigError(f"{prefix}.max_sessions_per_worker", f"got {self.max_sessions_per_worker}",
                              "use at least 1")
        require_at_least(self, prefix, "recycle_after", 1)
        if self.verify_budget_s <= 0:
            raise ConfigError(f"{prefix}.verify_budget_s", f"got {self.verify_budget_s}", "use a positive number of seconds")
        if self.actor_retries < 0:
            raise ConfigError(f"{prefix}.actor_retries", f"got {self.actor_retries}", "use 0 or more")
        if self.max_output_pixels < 1:
            raise ConfigError(f"{prefix}.max_output_pixels", f"got {self.max_output_pixels}", "use a positive number")
        if self.max_stdout_chars < 0:
            raise ConfigError(f"{prefix}.max_stdout_chars", f"got {self.max_stdout_chars}", "use 0 or more")
        if self.max_code_chars < 1:
            raise ConfigError(f"{prefix}.max_code_chars", f"got {self.max_code_chars}", "use a positive number")
