"""Configuration of rollout workers and the agent loop (Hydra group `rollout`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cv_ray.agent.config import LoopSettings
from cv_ray.errors import ConfigError, require_at_least

#: How new weights reach the rollout engines (`rollout.vllm.weight_sync`; cv_ray/weight_sync.py does each):
#: `object_store` (learner -> CPU -> Ray's object store -> every worker; the HF engine's only path),
#: `nccl` (learner rank 0 broadcasts to every vLLM worker over one NCCL group, GPU to GPU) and
#: `ipc` (learner rank 0 and the engine share a GPU: vLLM reads the learner's own tensors through CUDA IPC).
WEIGHT_SYNC_PATHS = ("object_store", "nccl", "ipc")


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1
    """GPUs one vLLM engine shards the model over (tensor parallelism)."""
    gpu_memory_utilization: float = 0.6
    """Fraction of the GPU's memory vLLM may take (weights + KV cache); on a GPU shared with a learner
    rank (fractional `rollout.gpus_per_worker`) leave the rest for the learner."""
    enable_sleep_mode: bool = False
    """Free the KV cache between rollouts (colocated training)."""
    max_model_len: int = 32768
    """Longest prompt + response vLLM plans its KV cache for (tokens)."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture and torch.compile (faster start, slower decoding: smoke tests, debugging)."""
    weight_sync: str = "auto"
    """How the learner's weights reach the engines: `nccl` (GPU to GPU), `ipc` (engines on learner rank 0's
    GPU read its parameters in place), `object_store` (through CPU and Ray's object store) or `auto`: the
    fastest one the placement allows (cv_ray.config.weight_sync_path). Trainable parameters only, always."""
    weight_bucket_mb: int = 512
    """Weights travel in buckets of at most this many MiB: the NCCL broadcast's packed buffers (two on the
    learner's GPU and on every engine GPU, outside gpu_memory_utilization) and the object-store path's
    update calls."""

    def validate(self, prefix: str = "rollout.vllm") -> None:
        require_at_least(self, prefix, "tensor_parallel_size", 1)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{prefix}.gpu_memory_utilization", f"got {self.gpu_memory_utilization}",
                              "use a fraction in (0, 1], e.g. 0.6 (0.3 on a GPU shared with the learner)")
        require_at_least(self, prefix, "max_model_len", 1)
        if self.weight_sync not in ("auto", *WEIGHT_SYNC_PATHS):
            raise ConfigError(f"{prefix}.weight_sync", f"got {self.weight_sync!r}",
                              f"use auto, {', '.join(WEIGHT_SYNC_PATHS)}")
        require_at_least(self, prefix, "weight_bucket_mb", 1)


@dataclass
class RolloutConfig(LoopSettings):
    """Rollout workers and their engine; the agent loop's own keys (``max_turns``, ``temperature``, ...)
    come from :class:`cv_ray.agent.config.LoopSettings`, which this extends."""

    engine: str = "hf"
    """`hf` (transformers; CPU or GPU) or `vllm` (GPU only; needs the `vllm` extra)."""
    num_workers: int = 1
    """RolloutWorker actors; the batch is split across them."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 on CPU). With vLLM: tensor_parallel_size GPUs."""
    cpus_per_worker: float = 1.0
    """Ray CPUs reserved by each worker (its placement-group bundle); on CPU also the engine's torch threads."""
    n_samples: int = 4
    """Samples per task (the GRPO group size)."""
    hf_max_batch_size: int = 32
    """HF engine: most requests gathered into one padded `generate` call."""
    system_prompt: str = ""
    """The system prompt of every episode; empty: the built-in one (cv_ray.agent.prompts.SYSTEM_PROMPT).
    SFT conversations carry their own system message: write them with the same text."""
    tools_in_prompt: bool = True
    """List the tool's JSON schema in the system turn (the chat template's tools block, ~350 tokens
    with the tiny tokenizer). False suits a model taught the call format by SFT alone; the tool works
    the same either way. The SFT stage encodes with the same setting."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings (rollout=vllm)."""

    def validate(self, prefix: str = "rollout") -> None:
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"{prefix}.engine", f"got {self.engine!r}", "use `hf` or `vllm`")
        require_at_least(self, prefix, "num_workers", 1)
        if self.n_samples < 1:
            raise ConfigError(f"{prefix}.n_samples", f"got {self.n_samples}", "use at least 1 (GRPO needs 2+)")
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature", f"got {self.temperature}", "use 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p", f"got {self.top_p}", "use a value in (0, 1]")
        require_at_least(self, prefix, "max_turns", 1)
        if self.engine == "hf" and self.vllm.weight_sync not in ("auto", "object_store"):
            raise ConfigError(f"{prefix}.vllm.weight_sync", f"{self.vllm.weight_sync!r} with the HF engine",
                              "the HF engine loads weights from Ray's object store only: leave it at auto "
                              "(or use rollout=vllm for the GPU-to-GPU paths)")
        if self.engine == "vllm":
            self.vllm.validate(f"{prefix}.vllm")
            tp = self.vllm.tensor_parallel_size
            # One bundle holds exactly the engine's GPUs (cv_ray.placement); only a one-GPU engine may
            # take a fraction of a GPU (a GPU shared with a learner rank).
            fits = 0 < self.gpus_per_worker <= 1 if tp == 1 else self.gpus_per_worker == tp
            if not fits:
                raise ConfigError(f"{prefix}.gpus_per_worker",
                                  f"{self.gpus_per_worker} GPUs for tensor_parallel_size={tp}",
                                  "set rollout.gpus_per_worker to rollout.vllm.tensor_parallel_size (or a fraction "
                                  "in (0, 1] with tensor_parallel_size=1, to share a GPU with the learner)")
        if self.max_new_tokens_per_turn < 1 or self.max_response_tokens < 1:
            raise ConfigError(f"{prefix}.max_new_tokens_per_turn",
                              f"max_new_tokens_per_turn={self.max_new_tokens_per_turn}, "
                              f"max_response_tokens={self.max_response_tokens}", "use positive token budgets")
        if self.max_concurrent_trajectories < 1:
            raise ConfigError(f"{prefix}.max_concurrent_trajectories", f"got {self.max_concurrent_trajectories}",
                              "use at least 1")
        require_at_least(self, prefix, "hf_max_batch_size", 1)
        if self.tool_image_min_pixels < 1:
            raise ConfigError(f"{prefix}.tool_image_min_pixels", f"got {self.tool_image_min_pixels}",
                              "use a positive number of pixels")
        if self.tool_image_min_pixels > self.tool_image_max_pixels:
            raise ConfigError(f"{prefix}.tool_image_min_pixels", "larger than tool_image_max_pixels",
                              "lower tool_image_min_pixels or raise tool_image_max_pixels")
