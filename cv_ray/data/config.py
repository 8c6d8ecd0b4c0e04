"""Configuration of data generation and loading (Hydra group `data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.errors import ConfigError

_FAMILIES = ("orientation", "zoom", "multi_op", "degraded", "no_tool")
_SUITES = ("orientation", "small_region", "multi_op", "corruption", "no_tool")


@dataclass
class DataConfig:
    dir: str = "${trainer.work_dir}/data"
    """Dataset directory: written by `stage=data`, read by the other stages."""
    seed: int = 0
    """Generation is deterministic by seed."""
    families: list[str] = field(default_factory=lambda: list(_FAMILIES))
    """Synthetic task families to generate (see cv_ray/data/families.py), interleaved round-robin; or
    `[corner_orientation]` alone: the learning demo's teaching task (cv_ray/data/demo_family.py; its
    own SFT trajectories, no benchmark suites)."""
    rl_variants: list[str] = field(default_factory=list)
    """Keep only RL tasks (training and validation) of these variants (a task's `extra.variant`, e.g.
    `none` for an upright image); empty: every variant. SFT trajectories and suites are not filtered."""
    num_rl_tasks: int = 2000
    """Synthetic RL training tasks to generate (0: only data.train_files)."""
    num_sft_trajectories: int = 500
    """SFT trajectories to generate, each executed in the sandbox."""
    num_val_tasks: int = 64
    """Held-out RL tasks for validation during RL."""
    suites: list[str] = field(default_factory=lambda: list(_SUITES))
    """Benchmark suites to build: a bare name means its latest version (`orientation` -> `orientation-v1`)."""
    suite_size: int = 24
    """Base questions per benchmark suite (each orientation suite question yields 6 variants)."""
    sft_error_rate: float = 0.2
    """Share of tool-using SFT trajectories that start with a call that really fails, then recover."""
    image_size: int = 448
    """Side of generated images in pixels."""
    train_files: list[str] = field(default_factory=list)
    """Extra RL task files (our Parquet/JSONL, or the reference's parquet layout)."""
    sft_files: list[str] = field(default_factory=list)
    """Extra SFT files (our JSONL or LLaMA-Factory ShareGPT JSON)."""
    skip_bad_rows: bool = False
    """Skip malformed rows of the task and SFT files read (counted; the first 5 errors are logged)
    instead of stopping at the first; every other row is kept. A file that cannot be read at all
    always stops the run."""

    def validate(self, prefix: str = "data") -> None:
        for name in ("num_rl_tasks", "num_sft_trajectories", "num_val_tasks", "suite_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"got {getattr(self, name)}", "use 0 or more")
        if self.image_size < 56:
            raise ConfigError(f"{prefix}.image_size", f"got {self.image_size}", "use at least 56 pixels")
        if not 0.0 <= self.sft_error_rate <= 1.0:
            raise ConfigError(f"{prefix}.sft_error_rate", f"got {self.sft_error_rate}", "use a share in [0, 1]")
        from cv_ray.data.demo_family import FAMILY as DEMO_FAMILY
        from cv_ray.data.families import FAMILIES
        from cv_ray.data.suites import resolve_suite_name

        if not self.families:
            raise ConfigError(f"{prefix}.families", "empty", f"list some of {', '.join(FAMILIES)}")
        if DEMO_FAMILY in self.families and self.families != [DEMO_FAMILY]:
            raise ConfigError(f"{prefix}.families", f"{DEMO_FAMILY} mixed with {self.families}",
                              f"use [{DEMO_FAMILY}] alone (the demo task), or only registry families")
        for family in self.families:
            if family not in (*FAMILIES, DEMO_FAMILY):
                raise ConfigError(f"{prefix}.families", f"unknown family {family!r}",
                                  f"use {', '.join(FAMILIES)} (or {DEMO_FAMILY} alone)")
        for suite in self.suites:
            try:
                resolve_suite_name(suite)
            except KeyError as error:
                raise ConfigError(f"{prefix}.suites", str(error), f"use {', '.join(_SUITES)}") from error
