"""LearnerGroup: the driver's handle on the DeepSpeed learner (L Ray actors, one torch.distributed group).

The driver calls, in a run::

    with LearnerGroup(model, cfg.learner, total_steps=optimizer_steps, seed=cfg.trainer.seed,
                      temperature=cfg.rollout.temperature) as group:   # model: a ModelRef or a directory
        metrics = group.sft_step(samples)                  # SFT: one optimizer step on these sequences
        metrics = group.rl_step(samples)                   # RL: ppo_epochs x mini-batches of optimizer steps
        rollout.update_weights(group.gather_weights())     # ObjectRef of {hf_name: tensor}, gathered once
        group.save_checkpoint(path, {"data": DataPosition(...), ...}); client_state = group.load_checkpoint(path)
        group.export_hf(path)                              # a from_pretrained-loadable model directory

Samples are :class:`cv_ray.learner.batch.TrainSample` (``rl_sample`` / ``sft_sample`` build them).
The group splits every optimizer step's sequences evenly over the ranks (padding with zero-mask
copies when they do not divide, which add nothing to the loss or the gradient), computes the
aggregation's global denominator over the whole mini-batch, and sums the ranks' additive metric
shares. ``total_steps`` is the number of optimizer steps the LR schedule spans: one per ``sft_step``,
``ppo_epochs * (batch / mini_batch_size)`` per ``rl_step``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cv_ray.actor_group import ActorGroup, GroupShell
from cv_ray.learner.batch import TrainSample
from cv_ray.learner.config import LearnerConfig
from cv_ray.learner.losses import AGGREGATIONS, TokenMean
from cv_ray.learner.rank_actor import LearnerRank
from cv_ray.models import ModelRef
from cv_ray.placement import learner_placement

log = logging.getLogger(__name__)

_LEARNER_KEY = "_learner"


class LearnerGroup(GroupShell):
    def __init__(self, model: ModelRef | str | Path, cfg: LearnerConfig, total_steps: int = 0, seed: int = 0,
                 temperature: float = 1.0) -> None:
        """Start ``cfg.num_ranks`` rank actors and build the policy (and reference) engines on them.

        ``total_steps``: optimizer steps the LR schedule spans (0: warm-up-free constant rate, cosine
        never decays). ``seed``: model-side RNG and the RL mini-batch shuffles. ``temperature``: the
        one the rollout samples at; tokens are scored under it (importance ratio 1 on-policy).
        ``model``: a :class:`~cv_ray.models.ModelRef` (directory and image bounds), or a bare directory.
        """
        cfg.validate()
        self.cfg, self.seed, self.global_step = cfg, seed, 0
        world = cfg.num_ranks
        # One PACK placement group (cv_ray/placement.py): the ranks share as few nodes as fit, so
        # ZeRO-3's per-step gathers stay on a node where they can; SFT and RL groups alike.
        self.actors = ActorGroup(LearnerRank, world, name="learner ranks",
                                 placement=learner_placement(world, cfg.gpus_per_rank, cfg.cpus_per_rank),
                                 on_shutdown=lambda rank: rank.shutdown.remote())
        try:
            addr, port = ray.get(self.ranks[0].rendezvous_address.remote())
            start = time.perf_counter()
            model = ModelRef.of(model)
            self.actors.get(self.actors.zip(
                lambda rank, index: rank.setup.remote(index, world, addr, port, model, cfg, total_steps, seed,
                                                      temperature), range(world)))
        except BaseException:
            self.actors.shutdown()
            raise
        log.info("learner group up: %d rank(s), ZeRO-%d, %.1fs", world, cfg.zero_stage, time.perf_counter() - start)

    @property
    def ranks(self) -> list:
        """The rank actors, rank 0 first."""
        return self.actors.actors

    @property
    def placement_group(self):
        """The ranks' PACK placement group (removed at shutdown)."""
        return self.actors.placement_group

    # ------------------------------------------------------------------------------- data split

    def _shard(self, samples: Sequence[TrainSample]) -> list[list[TrainSample]]:
        """Equal-size contiguous shards, one per rank; short ones padded with zero-mask fillers.

        Equal sizes mean every rank runs the same number of micro-batches, which ZeRO-3's
        collective parameter gathers require; a filler's zero mask adds nothing to any share.
        """
        if not samples:
            raise ValueError("no samples")
        world = len(self.ranks)
        per_rank = -(-len(samples) // world)
        filler = dataclasses.replace(samples[-1], loss_mask=np.zeros_like(samples[-1].loss_mask))
        padded = list(samples) + [filler] * (per_rank * world - len(samples))
        return [padded[r * per_rank:(r + 1) * per_rank] for r in range(world)]

    def _check_trainable_vision(self, shards: list[list[TrainSample]]) -> None:
        """ZeRO-3 with a trainable vision tower needs an image in every micro-batch of a multi-rank step.

        The blank-image stand-in (cv_ray.learner.forward) keeps the forward collectives aligned, but
        DeepSpeed's ZeRO-3 also checks that every rank recorded the same module trace through the
        backward pass, which an image-less micro-batch breaks when the tower trains. Refuse before any
        rank starts, rather than fail on some ranks while the others wait.
        """
        cfg = self.cfg
        if cfg.zero_stage != 3 or cfg.freeze_vision or len(shards) == 1:
            return
        micro = cfg.micro_batch_size
        for shard in shards:
            for first in range(0, len(shard), micro):
                if not any(s.images for s in shard[first:first + micro]):
                    raise ValueError("a micro-batch without images under ZeRO-3 with a trainable vision tower "
                                     "(learner.freeze_vision=false): give every sequence an image, set "
                                     "learner.freeze_vision=true, or use learner.zero_stage <= 2")

    def _run_update(self, update: Callable[[Any, list[TrainSample]], Any], samples: Sequence[TrainSample]
                    ) -> dict[str, float]:
        """One optimizer step: ``update(rank, shard)`` (an actor call) on every rank with its shard."""
        shards = self._shard(samples)
        self._check_trainable_vision(shards)
        start = time.perf_counter()
        results = self.actors.get(self.actors.zip(update, shards))
        seconds = time.perf_counter() - start
        self.global_step += 1
        merged: dict[str, float] = {}
        for result in results:
            for key, value in result["shares"].items():
                merged[key] = merged.get(key, 0.0) + value
        tokens = sum(r["tokens"] for r in results)
        merged.update(lr=results[0]["lr"], tokens=float(tokens), step_seconds=seconds,
                      tokens_per_s=tokens / seconds if seconds > 0 else 0.0)
        if "grad_norm" in results[0]:
            merged["grad_norm"] = results[0]["grad_norm"]
        return merged

    # ---------------------------------------------------------------------------------- steps

    def sft_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One optimizer step of masked NLL (token mean over all samples' assistant tokens).

        Returns ``loss`` (the batch's mean NLL before the step), ``entropy``, ``grad_norm`` (ZeRO >= 1 or
        bf16: DeepSpeed's fp32 ZeRO-0 does not compute it), ``lr``, ``tokens``, ``step_seconds``, ``tokens_per_s``.
        """
        denominator = sum(TokenMean().count(_mask(s)) for s in samples)
        if denominator == 0:
            raise ValueError("sft_step: no trained tokens in the batch (every loss_mask is 0)")
        metrics = self._run_update(lambda rank, shard: rank.sft_step.remote(shard, denominator), samples)
        return {f"sft/{k}": v for k, v in metrics.items()}

    def rl_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """``ppo_epochs`` passes over ``samples``, each split into shuffled mini-batches of ``mini_batch_size``.

        Every sample needs ``advantages`` and ``rollout_logprobs`` (:func:`cv_ray.learner.batch.rl_sample`).
        Returns the mean over updates of the objective's metrics (``loss``, ``pg_loss``, ``kl``,
        ``entropy``, clip fractions, ``ratio``, ...) plus ``updates`` and timings.
        """
        cfg = self.cfg
        mini = cfg.mini_batch_size or len(samples)
        if len(samples) % mini:
            raise ValueError(f"rl_step: {len(samples)} samples do not split into mini-batches of {mini} "
                             f"(learner.mini_batch_size)")
        n_updates = cfg.ppo_epochs * len(samples) // mini
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if cfg.loss.tis_cap > 0 and n_updates > 1:
            # Later updates need the policy as it was before the first one.
            t0 = time.perf_counter()
            old = self.compute_logprobs(samples, "policy")
            samples = [dataclasses.replace(s, old_logprobs=lp) for s, lp in zip(samples, old)]
            metrics["time/old_logprobs_s"] = time.perf_counter() - t0
        aggregation = AGGREGATIONS[cfg.loss.aggregation]
        rng = random.Random(self.seed * 1_000_003 + self.global_step)  # reproducible after a resume
        totals: dict[str, float] = {}
        done = 0
        for _ in range(cfg.ppo_epochs):
            order = list(range(len(samples)))
            if n_updates > cfg.ppo_epochs:
                rng.shuffle(order)
            for first in range(0, len(order), mini):
                batch = [samples[i] for i in order[first:first + mini]]
                denominator = sum(aggregation.count(_mask(s)) for s in batch)
                if denominator == 0:
                    metrics["skipped_empty_minibatches"] = metrics.get("skipped_empty_minibatches", 0.0) + 1
                    continue
                metrics_of_update = self._run_update(
                    lambda rank, shard, d=denominator: rank.rl_update.remote(shard, d), batch)
                for key, value in metrics_of_update.items():
                    totals[key] = totals.get(key, 0.0) + value
                done += 1
        metrics.update({k: v / max(1, done) for k, v in totals.items()})
        metrics.update(updates=float(done), step_seconds=time.perf_counter() - start)
        return {f"rl/{k}": v for k, v in metrics.items()}

    def compute_logprobs(self, samples: Sequence[TrainSample], which: str = "policy") -> list[np.ndarray]:
        """Per-sample ``[T]`` log-probs under ``policy`` or ``reference`` (no update), in sample order."""
        shards = self._shard(samples)
        per_rank = self.actors.get(self.actors.zip(lambda rank, shard: rank.compute_logprobs.remote(shard, which),
                                                   shards))
        return [lp for shard in per_rank for lp in shard][: len(samples)]

    # -------------------------------------------------------------------------------- weights

    def gather_weights(self, trainable_only: bool = False) -> ray.ObjectRef:
        """An ObjectRef of ``{hf_param_name: full CPU tensor}`` (gathered per bucket under ZeRO-3), in
        Ray's object store once, for ``RolloutGroup.update_weights``. Returns when the gather is done.
        ``trainable_only``: what a weight sync sends (the frozen vision tower stays out)."""
        refs = self.actors.each(lambda rank: rank.gather_weights.remote(trainable_only))
        ray.get(refs[1:])  # the other ranks return None once their part of the collective is done
        ray.wait(refs[:1], fetch_local=False)
        return refs[0]

    # The GPU-to-GPU weight paths; cv_ray/weight_sync.py drives them (cv_ray/learner/weight_sender.py).

    def weight_metadata(self) -> list:
        """``(name, dtype, full shape)`` of the trainable parameters, in the order every sync sends them."""
        return ray.get(self.ranks[0].weight_metadata.remote())

    def weight_sender_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port there: the NCCL weight group's rendezvous."""
        return ray.get(self.ranks[0].rendezvous_address.remote())

    def open_weight_sender(self, master_address: str, master_port: int, world_size: int,
                           bucket_bytes: int) -> ray.ObjectRef:
        """Rank 0 opens the NCCL weight group (rank 0 of ``world_size``). Returns the ref: it resolves
        once every engine worker has joined, which they do in their own calls meanwhile."""
        return self.ranks[0].open_weight_sender.remote(master_address, master_port, world_size, bucket_bytes)

    def broadcast_weights(self, metadata: list) -> list[ray.ObjectRef]:
        """Every rank walks the trainable parameters' gathers, rank 0 broadcasts them over the NCCL weight
        group; the refs (rank 0's: bytes sent) resolve once done, which needs the engines receiving."""
        return self.actors.each(lambda rank: rank.broadcast_weights.remote(metadata))

    def ipc_weight_handles(self) -> dict:
        """vLLM's IPC update info for rank 0's own trainable parameters on its GPU (one rank, ZeRO 0-2)."""
        return ray.get(self.ranks[0].ipc_weight_handles.remote())

    def gpu_uuid(self) -> str | None:
        """UUID of rank 0's GPU (None on CPU)."""
        return ray.get(self.ranks[0].gpu_uuid.remote())

    # ---------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any] | None = None) -> None:
        """Save DeepSpeed state, every rank's RNG, the learner's step and ``client_state`` (picklable)."""
        state = {_LEARNER_KEY: {"global_step": self.global_step}, "client": dict(client_state or {})}
        self.actors.get(self.actors.each(lambda rank: rank.save_checkpoint.remote(str(directory), state)))

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore a checkpoint written by a group of the same size and ZeRO stage; return its client_state."""
        states = self.actors.get(self.actors.each(lambda rank: rank.load_checkpoint.remote(str(directory))))
        self.global_step = states[0][_LEARNER_KEY]["global_step"]
        return states[0]["client"]

    def export_hf(self, directory: str | Path) -> Path:
        """Write full weights and the processor files as a Hugging Face model directory."""
        paths = self.actors.get(self.actors.each(lambda rank: rank.export_hf.remote(str(directory))))
        return Path(paths[0])

    def shutdown(self) -> None:
        """Leave the process group on every rank, then end the rank actors (idempotent)."""
        self.actors.shutdown()


def _mask(sample: TrainSample):
    import torch

    return torch.from_numpy(sample.loss_mask)[None]
