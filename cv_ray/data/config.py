"""Configuration of data generation and loading (Hydra group `data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.errors import ConfigError


@dataclass
class DataConfig:
    dir: str = "${trainer.work_dir}/data"
    """Dataset directory: written by `stage=data`, read by the other stages."""
    seed: int = 0
    """Generation is deterministic by seed."""
    families: list[str] = field(default_factory=lambda: ["orientation", "zoom", "multi_op", "degraded", "no_tool"])
    """Synthetic task families to generate."""
    num_rl_tasks: int = 2000
    num_sft_trajectories: int = 500
    num_val_tasks: int = 64
    suite_size: int = 24
    """Base questions per benchmark suite (each orientation suite question yields 6 variants)."""
    image_size: int = 448
    """Side of generated images in pixels."""
    train_files: list[str] = field(default_factory=list)
    """Extra RL task files (our Parquet/JSONL, or the reference's parquet layout)."""
    sft_files: list[str] = field(default_factory=list)
    """Extra SFT files (our JSONL or LLaMA-Factory ShareGPT JSON)."""

    def validate(self, prefix: str = "data") -> None:
        for name in ("num_rl_tasks", "num_sft_trajectories", "num_val_tasks", "suite_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"got {getattr(self, name)}", "use 0 or more")
        if self.image_size < 56:
            raise ConfigError(f"{prefix}.image_size", f"got {self.image_size}", "use at least 56 pixels")
