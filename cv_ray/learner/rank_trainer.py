"""One learner rank's work: the DeepSpeed policy engine, the reference model, and their steps.

Plain Python (no Ray): :class:`cv_ray.learner.rank_actor.LearnerRank` hosts one per actor after joining
the torch.distributed group. Every public method is collective under data parallelism: all ranks of
the group call it together, each with its own shard of the data, and the shards must have the same
number of sequences (so every rank runs the same number of forward passes; see
``LearnerGroup._shard``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cv_ray.learner import checkpoint, weight_sender
from cv_ray.learner.batch import ModelBatch, TrainSample, collate
from cv_ray.learner.config import LearnerConfig
from cv_ray.learner.forward import sequence_logprobs
from cv_ray.learner.losses import RLObjective, RLTokens, build_rl_objective, sft_loss
from cv_ray.learner.schedule import LR_SCHEDULES, warmup_steps_for
from cv_ray.learner.weights import iter_full_weights
from cv_ray.models import ModelRef

LossFn = Callable[[ModelBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def deepspeed_config(cfg: LearnerConfig, world_size: int, bf16: bool, stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of the policy (or, with ``stage`` given and no optimizer, the reference).

    Gradient accumulation is ours (``managed_gradient_accumulation: false``): each micro-batch's
    ``backward`` only accumulates, and ``step()`` reduces across ranks and updates, however many
    micro-batches a step had.
    """
    stage = cfg.zero_stage if stage is None else stage
    zero: dict[str, Any] = {"stage": stage}
    if stage < 2:
        zero["overlap_comm"] = False  # DeepSpeed allows overlap with caller-owned accumulation only from stage 2
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer (no compiled ops needed)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class RankTrainer:
    """Policy (DeepSpeed engine) + optional reference model on one rank of the learner group."""

    def __init__(self, model_ref: ModelRef, cfg: LearnerConfig, rank: int, world_size: int, total_steps: int,
                 seed: int, temperature: float) -> None:
        import deepspeed
        from transformers import AutoModelForImageTextToText

        from cv_ray.agent.chat import banned_token_ids

        self.cfg, self.rank, self.world_size, self.model_path = cfg, rank, world_size, model_ref.path
        self.temperature = temperature
        use_cuda = cfg.gpus_per_rank > 0 and torch.cuda.is_available()
        if cfg.gpus_per_rank > 0 and not use_cuda:
            raise RuntimeError("learner.gpus_per_rank > 0 but this rank sees no CUDA device")
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
        if not use_cuda:
            torch.set_num_threads(max(1, int(cfg.cpus_per_rank)))
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.partitioned = cfg.zero_stage == 3

        ds_config = deepspeed_config(cfg, world_size, bf16)
        if self.partitioned:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept alive on purpose: while it exists, from_pretrained builds the model under
            # zero.Init, so each rank only ever materialises its shard of the weights.
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

        def load():
            return AutoModelForImageTextToText.from_pretrained(
                self.model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                attn_implementation=cfg.attn_implementation)

        model = load()
        model.config.use_cache = False
        if cfg.freeze_vision:
            model.get_submodule("model.visual").requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=use_cuda or None)
        warmup = warmup_steps_for(total_steps, cfg.warmup_ratio)
        schedule = LR_SCHEDULES[cfg.lr_schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, warmup, total_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, dist_init_required=False)
        self.module = self.engine.module

        self.reference: Callable | None = None
        if cfg.loss.kl_coef > 0:
            ref = load().requires_grad_(False).eval()
            if self.partitioned:
                ref_config = deepspeed_config(cfg, world_size, bf16, stage=3)
                ref_config.pop("managed_gradient_accumulation")
                self.reference, _, _, _ = deepspeed.initialize(model=ref, config=ref_config, dist_init_required=False)
            else:
                self.reference = ref.to(self.device)

        # The run's image bounds (model.min_pixels / max_pixels): the same pixels and image-token
        # counts as the rollout engines produced for these sequences.
        self.processor = model_ref.load_processor()
        self.pad_id = self.processor.tokenizer.pad_token_id or 0
        self.banned_ids = banned_token_ids(self.module.config)
        self.weight_sender: weight_sender.NcclWeightSender | None = None
        self._ipc_exported: list[torch.Tensor] = []  # the last IPC export, referenced until the next one
        self.objective: RLObjective = build_rl_objective(
            cfg.loss.policy_loss, cfg.loss.aggregation, cfg.loss.kl_estimator, clip_low=cfg.loss.clip_low,
            clip_high=cfg.loss.clip_high, dual_clip=cfg.loss.dual_clip, kl_coef=cfg.loss.kl_coef,
            entropy_coef=cfg.loss.entropy_coef, tis_cap=cfg.loss.tis_cap)

    # ---------------------------------------------------------------------------------- scoring

    def _logprobs(self, model: Callable, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # The vision tower to run on image-less micro-batches is that of the model being called
        # (a DeepSpeed engine wraps it in `.module`).
        touch = getattr(model, "module", model) if self.world_size > 1 else None
        return sequence_logprobs(model, batch, self.temperature, self.banned_ids, touch_vision=touch,
                                 chunk_tokens=self.cfg.logprob_chunk_tokens)

    def compute_logprobs(self, samples: Sequence[TrainSample], which: str) -> list[np.ndarray]:
        """Per-sample ``[T]`` float32 log-probs under the ``policy`` or the ``reference`` (no gradient)."""
        models = {"policy": self.engine, "reference": self.reference}
        model = models.get(which)
        if model is None:
            raise ValueError(f"no {which!r} model on this learner (reference exists only when kl_coef > 0)")
        self.engine.eval()
        out: list[np.ndarray] = []
        with torch.no_grad():
            for micro in _chunks(samples, self.cfg.micro_batch_size):
                batch = collate(micro, self.processor, self.pad_id).to(self.device)
                logp, _ = self._logprobs(model, batch)
                out += [logp[i, :n].cpu().numpy() for i, n in enumerate(batch.lengths)]
        return out

    # --------------------------------------------------------------------------------- updates

    def _update(self, samples: Sequence[TrainSample], loss_fn: LossFn) -> dict[str, Any]:
        """Forward/backward every micro-batch, then one optimizer step. Returns additive shares and step stats."""
        start = time.perf_counter()
        self.engine.train()
        shares: dict[str, float] = {}
        tokens = 0
        for micro in _chunks(samples, self.cfg.micro_batch_size):
            batch = collate(micro, self.processor, self.pad_id).to(self.device)
            logp, entropy = self._logprobs(self.engine, batch)
            loss, metrics = loss_fn(batch, logp, entropy)
            # DeepSpeed averages gradients over ranks; the loss is already this micro-batch's share
            # of the whole mini-batch, so undo the average to make the result the sum of shares.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            for key, value in metrics.items():
                shares[key] = shares.get(key, 0.0) + value
            tokens += sum(batch.lengths)
        self.engine.step()
        result = {"shares": shares, "lr": float(self.engine.get_lr()[0]), "tokens": tokens,
                  "seconds": time.perf_counter() - start}
        # The norm of the reduced gradient before clipping. DeepSpeed computes it in its ZeRO (1-3)
        # and bf16 optimizers; plain fp32 ZeRO-0 does not report it, and then neither do we.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        return result

    def sft_step(self, samples: Sequence[TrainSample], denominator: float) -> dict[str, Any]:
        """One optimizer step of masked NLL; ``denominator``: trained tokens of the whole mini-batch."""
        return self._update(samples, lambda batch, logp, ent: sft_loss(logp, ent, batch.loss_mask, denominator))

    def rl_update(self, samples: Sequence[TrainSample], denominator: float) -> dict[str, Any]:
        """One optimizer step of the RL objective; ``denominator`` from the aggregation over the mini-batch."""
        objective = self.objective

        def loss_fn(batch: ModelBatch, logp: torch.Tensor, entropy: torch.Tensor):
            if batch.advantages is None:
                raise ValueError("rl_step needs samples with advantages (see cv_ray.learner.batch.rl_sample)")
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp, _ = self._logprobs(self.reference, batch)
            if batch.old_logprobs is not None:
                old = batch.old_logprobs
            elif objective.tis_cap > 0:
                # A single update per step: the pre-update policy is the current one, exactly.
                old = logp.detach()
            elif batch.rollout_logprobs is not None:
                old = batch.rollout_logprobs
            else:
                raise ValueError("rl_step needs rollout_logprobs on every sample")
            tokens = RLTokens(logprobs=logp, entropy=entropy, old_logprobs=old, advantages=batch.advantages,
                              mask=batch.loss_mask, ref_logprobs=ref_logp, rollout_logprobs=batch.rollout_logprobs)
            return objective(tokens, denominator)

        return self._update(samples, loss_fn)

    # ------------------------------------------------------------------- weights and checkpoints

    def _full_weights(self, trainable_only: bool, device: torch.device | str):
        bucket = self.cfg.weight_bucket_mb * 2**20 // self.module.dtype.itemsize
        # Every rank walks all buckets (the gathers are collective); only rank 0 keeps copies.
        return iter_full_weights(self.module, self.partitioned, keep=self.rank == 0, bucket_numel=bucket,
                                 trainable_only=trainable_only, device=device)

    def gather_weights(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Full weights (HF names, CPU tensors) on rank 0; None on the other ranks (collective).
        ``trainable_only``: the parameters a weight sync sends (the frozen vision tower stays out)."""
        weights = dict(self._full_weights(trainable_only, "cpu"))
        return weights if self.rank == 0 else None

    # The GPU-to-GPU weight paths (cv_ray/weight_sync.py; cv_ray/learner/weight_sender.py).

    def weight_metadata(self) -> list[weight_sender.ParamMeta]:
        """``(name, dtype, full shape)`` of the trainable parameters, in the order a sync sends them."""
        return weight_sender.weight_metadata(self.module, trainable_only=True)

    def open_weight_sender(self, master_address: str, master_port: int, world_size: int, bucket_bytes: int) -> None:
        """Rank 0: open the NCCL weight group as its rank 0 (returns once every engine worker joined)."""
        if self.rank == 0:
            self.weight_sender = weight_sender.NcclWeightSender(master_address, master_port, world_size, bucket_bytes)

    def broadcast_weights(self, metadata: list[weight_sender.ParamMeta]) -> int:
        """Collective: every rank walks the gathers of the trainable parameters; rank 0 broadcasts them
        over the NCCL weight group (the engines receive meanwhile). Returns the bytes sent (0 elsewhere)."""
        tensors = self._full_weights(trainable_only=True, device=self.device)
        if self.rank != 0:
            for _ in tensors:
                pass
            return 0
        if self.weight_sender is None:
            raise RuntimeError("broadcast_weights before open_weight_sender: the NCCL weight group is not open")
        return self.weight_sender.send(tensors, metadata)

    def ipc_weight_handles(self) -> dict[str, Any]:
        """Rank 0: vLLM's IPC update info pointing at the trainable parameters where they lie on this GPU."""
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # release what the engines let go of after the previous sync
        info, self._ipc_exported = weight_sender.ipc_update_info(self.module, self.gpu_uuid(), trainable_only=True)
        return info

    def gpu_uuid(self) -> str | None:
        """UUID of this rank's GPU (None on CPU): how a colocated engine is recognised."""
        if self.device.type != "cuda":
            return None
        return str(torch.cuda.get_device_properties(self.device).uuid)

    def close_weight_sender(self) -> None:
        if self.weight_sender is not None:
            self.weight_sender.close()
            self.weight_sender = None

    def save_checkpoint(self, directory: str, client_state: dict[str, Any]) -> None:
        checkpoint.save_checkpoint(self.engine, directory, self.rank, client_state)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        return checkpoint.load_checkpoint(self.engine, directory, self.rank)

    def export_hf(self, directory: str) -> str | None:
        weights = self.gather_weights(trainable_only=False)
        if self.rank != 0:
            return None
        return str(checkpoint.export_hf(self.module, weights, self.model_path, Path(directory)))

