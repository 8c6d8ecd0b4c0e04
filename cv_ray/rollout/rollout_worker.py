"""RolloutWorker (a Ray actor) and RolloutGroup (the driver's handle on all of them).

A RolloutWorker is a thin shell: it builds an engine (``cfg.engine``), a chat codec from the
model's processor and an :class:`~cv_ray.agent.loop.AgentLoop` over the sandbox group it is given,
and exposes ``rollout``, ``update_weights`` and a generation-free ``health`` check. It is an async
actor, so one worker runs many agent loops concurrently on its event loop.

RolloutGroup creates ``cfg.num_workers`` workers (each in its own placement-group bundle of
``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs when GPUs are asked for), splits a batch of
tasks across them, and returns the trajectories in task order with the batch's metrics.
Weights are put in Ray's object store once and read by every worker; their names are the Hugging
Face state-dict names of the ``*ForConditionalGeneration`` model (``model.named_parameters()``).
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from cv_ray.rollout.config import RolloutConfig
from cv_ray.rollout.metrics import batch_metrics
from cv_ray.types import Task, Trajectory


@ray.remote
class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutConfig, sandbox_group: Any):
        from transformers import AutoProcessor

        from cv_ray.agent.chat import codec_from_config
        from cv_ray.agent.loop import AgentLoop
        from cv_ray.rollout.engine import make_engine

        if cfg.gpus_per_worker == 0:
            import torch

            # Ray's workers start with OMP_NUM_THREADS=1 (cv_ray.cluster); a CPU engine uses its CPU share.
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.model_path = str(model_path)
        self.engine = make_engine(self.model_path, cfg)
        self.codec = codec_from_config(AutoProcessor.from_pretrained(self.model_path), cfg)
        self.loop = AgentLoop(self.engine, self.codec, sandbox_group, cfg)
        self.in_flight = 0

    async def rollout(self, tasks: list[Task], n_samples: int, temperature: float | None = None,
                      use_tools: bool = True) -> list[Trajectory]:
        """``n_samples`` trajectories per task, task-major (see AgentLoop.run_many)."""
        self.in_flight += len(tasks) * n_samples
        try:
            return await self.loop.run_many(tasks, n_samples, temperature, use_tools)
        finally:
            self.in_flight -= len(tasks) * n_samples

    async def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        return await self.engine.update_weights(named_tensors)

    async def health(self) -> dict[str, Any]:
        return {**self.engine.describe(), "in_flight": self.in_flight, "node": ray.get_runtime_context().get_node_id()}


def split_evenly(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges covering ``n_items`` in ``n_parts`` parts whose sizes differ by at most 1."""
    base, extra = divmod(n_items, n_parts)
    ranges, start = [], 0
    for part in range(n_parts):
        end = start + base + (1 if part < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class RolloutGroup:
    def __init__(self, model_path: str, cfg: RolloutConfig, sandbox_group: Any):
        self.cfg = cfg
        self.placement_group = None
        options: list[dict[str, Any]] = [{"num_cpus": cfg.cpus_per_worker}] * cfg.num_workers
        if cfg.gpus_per_worker > 0:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            from cv_ray.placement import rollout_placement

            plan = rollout_placement(cfg.num_workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
            self.placement_group = placement_group(plan.bundles, strategy=plan.strategy)
            ray.get(self.placement_group.ready())
            options = [
                {**opt, "scheduling_strategy": PlacementGroupSchedulingStrategy(self.placement_group, bundle)}
                for opt, bundle in zip(plan.actor_options, plan.actor_bundle)
            ]
        self.workers = [RolloutWorker.options(**opt).remote(model_path, cfg, sandbox_group) for opt in options]

    def rollout(self, tasks: list[Task], n_samples: int | None = None, temperature: float | None = None,
                use_tools: bool = True) -> tuple[list[Trajectory], dict[str, float]]:
        """Trajectories of every task (``n_samples`` each, default ``cfg.n_samples``), in task order, and batch metrics.

        ``temperature`` overrides ``cfg.temperature`` for this batch (0: greedy); ``use_tools=False``
        runs tool-free episodes (no tool schema in the prompt, one turn).
        """
        n_samples = n_samples or self.cfg.n_samples
        started = time.perf_counter()
        parts = [(s, e) for s, e in split_evenly(len(tasks), len(self.workers)) if e > s]
        refs = [worker.rollout.remote(tasks[s:e], n_samples, temperature, use_tools)
                for worker, (s, e) in zip(self.workers, parts)]
        trajectories = [t for chunk in ray.get(refs) for t in chunk]
        return trajectories, batch_metrics(trajectories, time.perf_counter() - started)

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> list[int]:
        """Push one set of weights to every worker (one copy in the object store); returns their versions."""
        ref = ray.put(named_tensors)
        return ray.get([worker.update_weights.remote(ref) for worker in self.workers])

    def health(self) -> list[dict[str, Any]]:
        return ray.get([worker.health.remote() for worker in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
        self.workers = []
