"""The typed configuration tree behind `conf/` (Hydra structured configs).

Each subsystem owns the dataclass of its own group (``cv_ray.<subsystem>.config``); this module
composes them into :class:`Config`, registers the schema in Hydra's ConfigStore, and validates a
whole tree before any actor starts. Components receive only their own sub-config.

The YAML groups in ``conf/`` fill the schema; ``conf/config.yaml`` lists the defaults and
``experiment=tiny_cpu`` is the default experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cv_ray.data.config import DataConfig
from cv_ray.errors import ConfigError
from cv_ray.learner.config import LearnerConfig
from cv_ray.reward.config import RewardConfig
from cv_ray.rollout.config import RolloutConfig
from cv_ray.sandbox.config import SandboxConfig

STAGES = ("data", "sft", "rl", "eval", "pipeline")


@dataclass
class ModelConfig:
    path: str = "${trainer.work_dir}/tiny-qwen2_5_vl"
    """A Hugging Face model directory (a real checkpoint, or the tiny model built locally)."""
    family: str = "auto"
    """`auto` (read from the checkpoint's config), `qwen2_5_vl` or `qwen3_vl`."""
    build_tiny: str = ""
    """If set (`qwen2_5_vl` or `qwen3_vl`) and `path` does not exist, build the tiny random model there."""
    min_pixels: int = 28 * 28 * 4
    """Image processor lower bound for the task images (pixels)."""
    max_pixels: int = 28 * 28 * 256
    """Image processor upper bound for the task images (pixels)."""

    def validate(self, prefix: str = "model") -> None:
        if self.family not in ("auto", "qwen2_5_vl", "qwen3_vl"):
            raise ConfigError(f"{prefix}.family", f"got {self.family!r}", "use `auto`, `qwen2_5_vl` or `qwen3_vl`")
        if self.build_tiny not in ("", "qwen2_5_vl", "qwen3_vl"):
            raise ConfigError(f"{prefix}.build_tiny", f"got {self.build_tiny!r}",
                              "use an empty string, `qwen2_5_vl` or `qwen3_vl`")
        if not self.path:
            raise ConfigError(f"{prefix}.path", "empty", "give a model directory, e.g. model.path=/ckpt/Qwen2.5-VL-7B")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"{prefix}.min_pixels", "larger than max_pixels", "lower min_pixels or raise max_pixels")


@dataclass
class SFTScheduleConfig:
    epochs: float = 2.0
    """Passes over the SFT trajectories (fractions allowed), unless max_steps stops first."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run the epochs)."""
    batch_size: int = 16
    """Sequences per optimizer step across all ranks."""
    lr: float = 1e-5
    """Peak SFT learning rate (RL uses learner.lr)."""


@dataclass
class RLScheduleConfig:
    steps: int = 100
    """RL steps (one rollout batch and its updates each)."""
    batch_size: int = 64
    """Tasks (prompts) per RL step; each is sampled rollout.n_samples times."""
    advantage: str = "grpo"
    """Registered advantage estimator the driver applies to each group's rewards (cv_ray.learner.advantages)."""
    adv_std_norm: bool = True
    """Divide group-centred rewards by the group's standard deviation."""
    max_staleness: int = 0
    """Asynchronous RL (k): 0 is the synchronous step (rollout, then update). k >= 1 streams: rollouts
    for the coming steps keep running while the learner updates, and a step at policy version v trains
    only on trajectories whose oldest token was sampled by version >= v - k. The loss then corrects for
    the lag (decoupled PPO: learner.loss.tis_cap, 2 unless set; docs/learner.md)."""
    filter_flat_groups: bool = False
    """Dynamic sampling (DAPO): drop groups whose rewards are all equal (no GRPO signal) and keep
    sampling until the step has batch_size groups; uses the streaming loop, also with max_staleness=0."""
    mask_overlong: bool = False
    """Take trajectories stopped by a token limit (stop reason `max_tokens`) out of the loss (mask 0)."""


@dataclass
class TrainerConfig:
    stage: str = "pipeline"
    """`data`, `sft`, `rl`, `eval` or `pipeline` (data, SFT, RL, eval in order)."""
    name: str = "default"
    """Run name: the run directory is `<run_root>/<name>` (sweeps: `<run_root>/<name>-sweep/<job>`)."""
    run_root: str = "runs"
    """Parent directory of run directories (relative to the directory cv-ray is started in)."""
    work_dir: str = "runs/default"
    """Everything a run writes goes here (model, data, checkpoints, metrics, viewer, report).
    The YAML sets it to Hydra's output directory, so each sweep job gets its own."""
    seed: int = 0
    """Seeds the SFT and RL batch order and the learner (model-side RNG, RL mini-batch shuffles).
    Data generation has its own `data.seed`."""
    resume: str = "never"
    """`never`, `auto` (latest checkpoint in work_dir if any) or a checkpoint path."""
    eval_every: int = 0
    """Evaluate every N RL steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N RL steps (0: only at the end)."""
    ray_num_cpus: int = 0
    """CPUs of a local Ray cluster (0: Ray's default). Overcommit to schedule many actors on few cores."""
    sft: SFTScheduleConfig = field(default_factory=SFTScheduleConfig)
    """SFT schedule; SFT runs its own learner group from the `learner` config with this `lr`."""
    rl: RLScheduleConfig = field(default_factory=RLScheduleConfig)
    """RL schedule."""

    def validate(self, prefix: str = "trainer") -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"{prefix}.stage", f"got {self.stage!r}", f"use one of {', '.join(STAGES)}")
        if self.resume not in ("never", "auto") and not self.resume:
            raise ConfigError(f"{prefix}.resume", "empty", "use `never`, `auto` or a checkpoint path")
        from cv_ray.learner.advantages import ADVANTAGE_ESTIMATORS

        if self.rl.advantage not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(f"{prefix}.rl.advantage", f"got {self.rl.advantage!r}",
                              f"use one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
        if self.rl.batch_size < 1:
            raise ConfigError(f"{prefix}.rl.batch_size", f"got {self.rl.batch_size}", "use at least 1")
        if self.rl.max_staleness < 0:
            raise ConfigError(f"{prefix}.rl.max_staleness", f"got {self.rl.max_staleness}",
                              "use 0 (synchronous) or a number of policy versions >= 1")
        if self.sft.batch_size < 1:
            raise ConfigError(f"{prefix}.sft.batch_size", f"got {self.sft.batch_size}", "use at least 1")


@dataclass
class LoggerConfig:
    backends: list[str] = field(default_factory=lambda: ["console"])
    """Any of `console`, `jsonl`, `wandb`."""
    wandb_project: str = "cv_ray"
    """wandb project of every run (a sweep's jobs are separate runs in it)."""
    wandb_mode: str = "offline"
    """`online`, `offline` or `disabled`."""
    samples_per_step: int = 4
    """Rollout samples written to the viewer per logged step."""


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["orientation"])
    """Benchmark suites: names built by the data stage (`orientation`, `small_region`, `multi_op`,
    `corruption`, `no_tool`) or paths to suite files (ours, or the reference's mvtoolbench Parquet)."""
    model: str = ""
    """Model to evaluate: empty for the newest model of the run (RL, then SFT, else model.path),
    or any model directory."""
    with_tools: bool = True
    """Evaluate with the code tool in the prompt."""
    without_tools: bool = True
    """Also evaluate with the same prompts and no tool schema (the robustness baseline)."""
    n_samples: int = 1
    """Episodes per task (more than 1 with temperature > 0 to estimate sampled accuracy)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""


@dataclass
class Config:
    """The whole tree; each component receives only its own group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The checkpoint every group starts from (`model=` picks a preset)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout workers and the agent loop (`rollout=hf|vllm`)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Sandbox executors that run model-written code."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Dense process reward weights, answer checking and the optional LLM judge."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """DeepSpeed learner group, losses and optimizer (`learner=cpu|zero3_gpu`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset location, generation sizes and user data files."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Stage, run directory, schedules, checkpoints, resume."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric back-ends (`logger=console|wandb`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmark evaluation (stage `eval` and the end of `pipeline`)."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [base_config, ...]`)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def to_typed(cfg: DictConfig | Config) -> Config:
    """Resolve interpolations and return plain dataclass instances (no OmegaConf at run time)."""
    if isinstance(cfg, Config):
        return cfg
    if not OmegaConf.is_config(cfg):
        raise TypeError(f"expected a DictConfig or Config, got {type(cfg).__name__}")
    structured = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    OmegaConf.resolve(structured)
    return OmegaConf.to_object(structured)  # type: ignore[return-value]


def validate(cfg: Config) -> None:
    """Check every group, then the rules that span groups. Raises ConfigError naming the key."""
    cfg.model.validate("model")
    cfg.rollout.validate("rollout")
    cfg.sandbox.validate("sandbox")
    cfg.reward.validate("reward")
    cfg.learner.validate("learner")
    cfg.data.validate("data")
    cfg.trainer.validate("trainer")
    for backend in cfg.logger.backends:
        if backend not in ("console", "jsonl", "wandb"):
            raise ConfigError("logger.backends", f"unknown backend {backend!r}", "use console, jsonl and/or wandb")
    if cfg.logger.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError("logger.wandb_mode", f"got {cfg.logger.wandb_mode!r}", "use online, offline or disabled")
    if cfg.eval.model and not (Path(cfg.eval.model) / "config.json").exists():
        raise ConfigError("eval.model", f"{cfg.eval.model} is not a Hugging Face model directory (no config.json)",
                          "give a model directory, or leave eval.model empty for the run's newest model")
    if cfg.trainer.sft.batch_size % cfg.learner.num_ranks:
        raise ConfigError("trainer.sft.batch_size",
                          f"{cfg.trainer.sft.batch_size} sequences do not split over learner.num_ranks={cfg.learner.num_ranks}",
                          "make trainer.sft.batch_size a multiple of learner.num_ranks")
    if cfg.trainer.rl.filter_flat_groups and cfg.rollout.n_samples < 2:
        raise ConfigError("trainer.rl.filter_flat_groups",
                          f"rollout.n_samples={cfg.rollout.n_samples}: every group of one sample is flat",
                          "sample at least 2 per task (rollout.n_samples) or turn the filter off")
    sequences = cfg.trainer.rl.batch_size * cfg.rollout.n_samples
    mini = cfg.learner.mini_batch_size or sequences
    if sequences % mini:
        raise ConfigError("learner.mini_batch_size",
                          f"{sequences} sequences per RL step (trainer.rl.batch_size x rollout.n_samples) "
                          f"do not split into mini-batches of {mini}",
                          "make learner.mini_batch_size divide trainer.rl.batch_size * rollout.n_samples")
    if mini % cfg.learner.num_ranks:
        raise ConfigError("learner.mini_batch_size",
                          f"a mini-batch of {mini} sequences does not split over learner.num_ranks={cfg.learner.num_ranks}",
                          "make learner.mini_batch_size a multiple of learner.num_ranks")


def validate_resources(cfg: Config, resources: dict[str, float]) -> None:
    """Check the actor groups fit the Ray cluster (``ray.cluster_resources()``) before creating them."""
    gpus = resources.get("GPU", 0.0)
    if cfg.rollout.engine == "vllm" and gpus == 0:
        raise ConfigError("rollout.engine", "vllm asked for, but the Ray cluster has no GPU",
                          "use rollout=hf on CPU, or join a cluster with GPUs (RAY_ADDRESS)")
    wanted = cfg.rollout.num_workers * cfg.rollout.gpus_per_worker + cfg.learner.num_ranks * cfg.learner.gpus_per_rank
    if wanted > gpus:
        raise ConfigError("rollout.gpus_per_worker",
                          f"the groups ask for {wanted:g} GPUs (rollout {cfg.rollout.num_workers} x "
                          f"{cfg.rollout.gpus_per_worker:g} + learner {cfg.learner.num_ranks} x "
                          f"{cfg.learner.gpus_per_rank:g}) but the cluster has {gpus:g}",
                          "lower rollout.num_workers / rollout.gpus_per_worker / learner.num_ranks / "
                          "learner.gpus_per_rank, or add GPU nodes")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict:
    """A plain dict of any config dataclass (for logging and wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
