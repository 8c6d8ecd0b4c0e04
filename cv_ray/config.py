"""The typed configuration tree behind `conf/` (Hydra structured configs).

Each subsystem owns the dataclass of its own group (``cv_ray.<subsystem>.config``); this module
composes them into :class:`Config`, registers the schema in Hydra's ConfigStore, and validates a
whole tree before any actor starts. Components receive only their own sub-config.

The YAML groups in ``conf/`` fill the schema; ``conf/config.yaml`` lists the defaults and
``experiment=tiny_cpu`` is the default experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cv_ray.data.config import DataConfig
from cv_ray.errors import ConfigError, require_at_least
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
    tiny_spec: str = "tiny"
    """Size preset of the tiny model `build_tiny` builds: `tiny` (hidden 64, 2 layers; plumbing and
    tests) or `demo` (hidden 128, 4 layers; learns the quickstart's and the demo's task on CPU)."""
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
        from cv_ray.models.tiny import TINY_SPECS

        if self.tiny_spec not in TINY_SPECS:
            raise ConfigError(f"{prefix}.tiny_spec", f"got {self.tiny_spec!r}", f"use one of {', '.join(TINY_SPECS)}")
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
    """Everything a run writes goes here (model, data, checkpoints, metrics, dashboard, report).
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
    samples_per_step: int = 16
    """Trajectories of each RL step written to the dashboard and the wandb table (the step's first
    ones: whole GRPO groups when it is a multiple of rollout.n_samples; 0: none)."""
    dashboard: bool = True
    """Write the static dashboard, `<run>/dashboard/index.html` (opens from file://, no server)."""
    collapse_window: int = 10
    """Tool-use collapse alarm: compare each tool-use rate with its value this many logged steps
    earlier (0: no alarm). Rates: tool calls per trajectory and the valid share of calls."""
    collapse_drop: float = 0.5
    """Alarm when a rate fell by more than this fraction of its earlier value (0 < drop <= 1)."""
    collapse_min_rate: float = 0.05
    """No alarm when the earlier value was below this (a tool never really used cannot collapse)."""

    def validate(self, prefix: str = "logger") -> None:
        for backend in self.backends:
            if backend not in ("console", "jsonl", "wandb"):
                raise ConfigError(f"{prefix}.backends", f"unknown backend {backend!r}", "use console, jsonl and/or wandb")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"{prefix}.wandb_mode", f"got {self.wandb_mode!r}", "use online, offline or disabled")
        require_at_least(self, prefix, "samples_per_step", 0)
        require_at_least(self, prefix, "collapse_window", 0)  # 0: no alarm
        require_at_least(self, prefix, "collapse_min_rate", 0.0)
        if not 0 < self.collapse_drop <= 1:
            raise ConfigError(f"{prefix}.collapse_drop", f"got {self.collapse_drop}",
                              "use a fraction in (0, 1], e.g. 0.5 to warn when a rate halves")


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["orientation"])
    """Benchmark suites: names built by the data stage (`orientation`, `small_region`, `multi_op`,
    `corruption`, `no_tool`) or paths to suite files (ours, or the reference's mvtoolbench Parquet)."""
    model: str = ""
    """Model to evaluate: empty for the newest model of the run (RL, then SFT, else model.path),
    or any model directory."""
    models: list[str] = field(default_factory=list)
    """Instead, several models of this run side by side (`base`, `sft`, `rl`: those that exist), through
    one set of actors (`eval/comparison.md`); ignored when `eval.model` is set."""
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
    cfg.logger.validate("logger")
    for name in cfg.eval.models:
        if name not in ("base", "sft", "rl"):
            raise ConfigError("eval.models", f"unknown model {name!r}", "list some of base, sft, rl")
    if cfg.eval.model and not (Path(cfg.eval.model) / "config.json").exists():
        raise ConfigError("eval.model", f"{cfg.eval.model} is not a Hugging Face model directory (no config.json)",
                          "give a model directory, or leave eval.model empty for the run's newest model")
    if cfg.trainer.sft.batch_size % cfg.learner.num_ranks:
        raise ConfigError("trainer.sft.batch_size",
                          f"{cfg.trainer.sft.batch_size} sequences do not split over learner.num_ranks={cfg.learner.num_ranks}",
                          "make trainer.sft.batch_size a multiple of learner.num_ranks")
    check_weight_sync(cfg.rollout, cfg.learner)
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


def weight_sync_path(rollout: RolloutConfig, learner: LearnerConfig) -> str:
    """The weight path of a run (one of ``WEIGHT_SYNC_PATHS``; cv_ray/weight_sync.py does each).

    An explicit ``rollout.vllm.weight_sync`` is taken as given (:func:`check_weight_sync` refuses the
    impossible ones). ``auto`` picks the fastest one the placement allows: an HF engine reads the
    object store; vLLM engines on fractions of a GPU beside one learner rank on a fraction too
    (``experiment=single_gpu``) read its parameters in place through CUDA IPC; engines and learner
    ranks on whole GPUs share a NCCL broadcast; anything else (a learner on CPU) goes through the
    object store.
    """
    if rollout.engine != "vllm":
        return "object_store"
    if rollout.vllm.weight_sync != "auto":
        return rollout.vllm.weight_sync
    if learner.gpus_per_rank >= 1 and rollout.gpus_per_worker >= 1:
        return "nccl"
    if not _ipc_problems(rollout, learner) and rollout.gpus_per_worker < 1 and learner.gpus_per_rank < 1:
        return "ipc"
    return "object_store"


def _ipc_problems(rollout: RolloutConfig, learner: LearnerConfig) -> list[str]:
    """Why rank 0 could not share its parameters with the engines in place (empty: it can)."""
    return [text for broken, text in (
        (learner.num_ranks != 1, f"learner.num_ranks={learner.num_ranks} (one rank exports its parameters)"),
        (learner.gpus_per_rank <= 0, "the learner is on CPU"),
        (learner.zero_stage == 3, "learner.zero_stage=3 (rank 0 holds only a shard of each parameter)"),
        (rollout.vllm.tensor_parallel_size != 1,
         f"rollout.vllm.tensor_parallel_size={rollout.vllm.tensor_parallel_size} (engines span GPUs)"),
    ) if broken]


def check_weight_sync(rollout: RolloutConfig, learner: LearnerConfig) -> None:
    """The learner's side of an explicitly chosen weight path: NCCL joins learner rank 0 and every vLLM
    worker, each on a GPU of its own; CUDA IPC lets the one-GPU engines read rank 0's parameters where
    they lie, so rank 0 holds them whole (one rank, ZeRO 0-2) on the GPU the engines share (checked
    again by GPU UUID at set-up)."""
    path = weight_sync_path(rollout, learner)
    key = "rollout.vllm.weight_sync"
    if path == "nccl" and not (learner.gpus_per_rank >= 1 and rollout.gpus_per_worker >= 1):
        raise ConfigError(key, f"nccl with learner.gpus_per_rank={learner.gpus_per_rank:g} and "
                          f"rollout.gpus_per_worker={rollout.gpus_per_worker:g}",
                          "NCCL needs learner rank 0 and every engine on whole GPUs of their own; with the "
                          "learner on CPU use object_store, with one shared GPU use ipc (or leave it at auto)")
    problems = _ipc_problems(rollout, learner) if path == "ipc" else []
    if problems:
        raise ConfigError(key, "ipc with " + "; ".join(problems),
                          "ipc needs one learner rank (ZeRO 0-2) on the GPU its one-GPU engines share "
                          "(experiment=single_gpu); otherwise use nccl (whole GPUs) or object_store, or leave it at auto")


def resolve_weight_sync(rollout: RolloutConfig, learner: LearnerConfig) -> RolloutConfig:
    """``rollout`` with ``vllm.weight_sync`` set to the run's path (``auto`` resolved): what the RL stage
    starts its rollout workers with (a vLLM engine builds the receiver of its path at start-up)."""
    return replace(rollout, vllm=replace(rollout.vllm, weight_sync=weight_sync_path(rollout, learner)))


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
