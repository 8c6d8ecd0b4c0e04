"""LearnerGroup: the driver's handle on the DeepSpeed learner (L Ray actors, one torch.distributed group).

The driver calls, in a run::

    group = LearnerGroup(model_path, cfg.learner, total_steps=optimizer_steps, seed=cfg.trainer.seed,
                         temperature=cfg.rollout.temperature)
    metrics = group.sft_step(samples)             # SFT: one optimizer step on these sequences
    metrics = group.rl_step(samples)              # RL: ppo_epochs x mini-batches of optimizer steps
    ref = group.gather_weights()                  # ObjectRef of {hf_name: tensor}; or:
    timings = group.push_weights(rollout_workers) # gather + worker.update_weights.remote(ref) on each
    group.save_checkpoint(path, {"data": DataPosition(...), ...}); client_state = group.load_checkpoint(path)
    group.export_hf(path)                         # a from_pretrained-loadable model directory
    group.shutdown()

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cv_ray.learner.batch import TrainSample
from cv_ray.learner.config import LearnerConfig
from cv_ray.learner.losses import AGGREGATIONS, TokenMean
from cv_ray.learner.rank_actor import LearnerRank
from cv_ray.placement import learner_placement

log = logging.getLogger(__name__)

_LEARNER_KEY = "_learner"


class LearnerGroup:
    def __init__(self, model_path: str | Path, cfg: LearnerConfig, total_steps: int = 0, seed: int = 0,
                 temperature: float = 1.0) -> None:
        """Start ``cfg.num_ranks`` rank actors and build the policy (and reference) engines on them.

        ``total_steps``: optimizer steps the LR schedule spans (0: warm-up-free constant rate, cosine
        never decays). ``seed``: model-side RNG and the RL mini-batch shuffles. ``temperature``: the
        one the rollout samples at; tokens are scored under it (importance ratio 1 on-policy).
        """
        cfg.validate()
        self.cfg, self.seed, self.global_step = cfg, seed, 0
        world = cfg.num_ranks
        # One PACK placement group (cv_ray/placement.py): the ranks share as few nodes as fit, so
        # ZeRO-3's per-step gathers stay on a node where they can; SFT and RL groups alike.
        plan = learner_placement(world, cfg.gpus_per_rank, cfg.cpus_per_rank)
        self.placement_group = placement_group(plan.bundles, strategy=plan.strategy)
        ray.get(self.placement_group.ready())
        self.ranks = [
            LearnerRank.options(**opt, scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, b))
            .remote(r, world)
            for r, (opt, b) in enumerate(zip(plan.actor_options, plan.actor_bundle))
        ]
        addr, port = ray.get(self.ranks[0].rendezvous_address.remote())
        start = time.perf_counter()
        ray.get([r.setup.remote(addr, port, str(model_path), cfg, total_steps, seed, temperature)
                 for r in self.ranks])
        log.info("learner group up: %d rank(s), ZeRO-%d, %.1fs", world, cfg.zero_stage, time.perf_counter() - start)

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

    def _run_update(self, method: str, samples: Sequence[TrainSample], denominator: float) -> dict[str, float]:
        shards = self._shard(samples)
        self._check_trainable_vision(shards)
        start = time.perf_counter()
        results = ray.get([getattr(rank, method).remote(shard, denominator) for rank, shard in zip(self.ranks, shards)])
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
        return {f"sft/{k}": v for k, v in self._run_update("sft_step", samples, denominator).items()}

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
                for key, value in self._run_update("rl_update", batch, denominator).items():
                    totals[key] = totals.get(key, 0.0) + value
                done += 1
        metrics.update({k: v / max(1, done) for k, v in totals.items()})
        metrics.update(updates=float(done), step_seconds=time.perf_counter() - start)
        return {f"rl/{k}": v for k, v in metrics.items()}

    def compute_logprobs(self, samples: Sequence[TrainSample], which: str = "policy") -> list[np.ndarray]:
        """Per-sample ``[T]`` log-probs under ``policy`` or ``reference`` (no update), in sample order."""
        shards = self._shard(samples)
        per_rank = ray.get([rank.compute_logprobs.remote(shard, which) for rank, shard in zip(self.ranks, shards)])
        return [lp for shard in per_rank for lp in shard][: len(samples)]

    # -------------------------------------------------------------------------------- weights

    def gather_weights(self) -> ray.ObjectRef:
        """An ObjectRef of ``{hf_param_name: full CPU tensor}`` (gathered per bucket under ZeRO-3)."""
        refs = [rank.gather_weights.remote() for rank in self.ranks]
        ray.get(refs[1:])  # the other ranks return None once their part of the collective is done
        return refs[0]

    def push_weights(self, receivers: Sequence[Any]) -> dict[str, float]:
        """Gather the weights once and call ``receiver.update_weights.remote(ref)`` on every actor handle."""
        start = time.perf_counter()
        ref = self.gather_weights()
        ray.wait([ref], fetch_local=False)
        gathered = time.perf_counter()
        ray.get([receiver.update_weights.remote(ref) for receiver in receivers])
        done = time.perf_counter()
        return {"push/gather_s": gathered - start, "push/update_s": done - gathered, "push/total_s": done - start}

    # ---------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any] | None = None) -> None:
        """Save DeepSpeed state, every rank's RNG, the learner's step and ``client_state`` (picklable)."""
        state = {_LEARNER_KEY: {"global_step": self.global_step}, "client": dict(client_state or {})}
        ray.get([rank.save_checkpoint.remote(str(directory), state) for rank in self.ranks])

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore a checkpoint written by a group of the same size and ZeRO stage; return its client_state."""
        states = ray.get([rank.load_checkpoint.remote(str(directory)) for rank in self.ranks])
        self.global_step = states[0][_LEARNER_KEY]["global_step"]
        return states[0]["client"]

    def export_hf(self, directory: str | Path) -> Path:
        """Write full weights and the processor files as a Hugging Face model directory."""
        paths = ray.get([rank.export_hf.remote(str(directory)) for rank in self.ranks])
        return Path(paths[0])

    def shutdown(self) -> None:
        ray.get([rank.shutdown.remote() for rank in self.ranks])
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def _mask(sample: TrainSample):
    import torch

    return torch.from_numpy(sample.loss_mask)[None]
