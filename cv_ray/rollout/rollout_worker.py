"""RolloutWorker (a Ray actor) and RolloutGroup (the driver's handle on all of them).

A RolloutWorker is a thin shell: it builds an engine (``cfg.engine``), a chat codec from the
model's processor (with the run's image bounds, :class:`~cv_ray.models.ModelRef`) and an
:class:`~cv_ray.agent.loop.AgentLoop` over the sandbox group it is given, and exposes ``rollout``,
``update_weights`` and a generation-free ``health`` check. It is an async actor, so one worker runs
many agent loops concurrently on its event loop.

RolloutGroup creates ``cfg.num_workers`` workers through the generic
:class:`~cv_ray.actor_group.ActorGroup` (each in its own placement-group bundle of
``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs when GPUs are asked for), splits a batch of
tasks across them, and returns the trajectories in task order with the batch's metrics.
``update_weights`` takes weights as an ObjectRef (what ``LearnerGroup.gather_weights`` returns: one
copy in Ray's object store, read by every worker) or as a dict; their names are the Hugging Face
state-dict names of the ``*ForConditionalGeneration`` model (``model.named_parameters()``). The
GPU-to-GPU paths of vLLM engines (``weight_endpoints``, ``init_weight_transfer``, ``receive_weights``)
are driven by cv_ray/weight_sync.py, which also picks the path.

The asynchronous RL loop (cv_ray/driver.py) streams instead: ``submit`` sends one task's group of
samples to the least-loaded worker and returns at once (the caller ``ray.wait``s on the ref), with a
``min_version``: the worker starts those episodes only once its engine holds weights of at least
that version, so a weight push need not be awaited before the next submissions. Workers are created
with ``max_restarts=-1`` and ``max_task_retries=-1``: Ray restarts one that dies and runs its calls in
flight again on the restarted worker, which starts from the checkpoint's weights (version 0). A
restarted worker asked for a version it has not received refuses at once (:class:`WeightsBehindError`)
rather than wait for a push nobody knows to send; the caller then pushes it the current weights and
submits the group again (cv_ray/driver.py, ``AsyncRollouts``).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cv_ray.actor_group import ActorGroup, GroupShell
from cv_ray.models import ModelRef
from cv_ray.placement import rollout_placement
from cv_ray.rollout.config import RolloutConfig
from cv_ray.rollout.metrics import batch_metrics
from cv_ray.types import Task, Trajectory

#: Builds a worker's engine from (model, config, chat codec); the default is ``make_engine`` by
#: ``cfg.engine``. Benchmarks and tests pass one that builds a ScriptedEngine.
EngineFactory = Callable[[ModelRef, RolloutConfig, Any], Any]


class WeightsBehindError(RuntimeError):
    """A restarted worker was asked to sample under weights it has not received."""


def _was_restarted() -> bool:
    """Whether Ray restarted this actor (``max_restarts``). Ray's own property reads its deprecated
    ``actor_id`` and warns on every worker start; the warning is about Ray's code, not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote
class RolloutWorker:
    def __init__(self, model: ModelRef, cfg: RolloutConfig, sandbox_group: Any,
                 engine_factory: EngineFactory | None = None):
        from cv_ray.agent.chat import codec_from_config
        from cv_ray.agent.loop import AgentLoop
        from cv_ray.rollout.engine import make_engine

        if cfg.gpus_per_worker == 0:
            import torch

            # Ray's workers start with OMP_NUM_THREADS=1 (cv_ray.cluster); a CPU engine uses its CPU share.
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.model = model
        self.codec = codec_from_config(model.load_processor(), cfg)
        self.engine = engine_factory(model, cfg, self.codec) if engine_factory else make_engine(model, cfg)
        self.loop = AgentLoop(self.engine, self.codec, sandbox_group, cfg)  # a RolloutConfig is LoopSettings
        self.in_flight = 0
        self.busy_s = 0.0
        """Seconds during which at least one episode was in flight (the asynchronous loop's idle metric)."""
        self._busy_since = 0.0
        self.restarted = _was_restarted()
        self.weights_received = 0
        self._new_weights = asyncio.Condition()

    def _count(self, episodes: int) -> None:
        now = time.monotonic()
        if self.in_flight > 0:
            self.busy_s += now - self._busy_since
        self._busy_since = now
        self.in_flight += episodes

    async def rollout(self, tasks: list[Task], n_samples: int, temperature: float | None = None,
                      use_tools: bool = True, seed: int | None = None,
                      min_version: int = 0) -> list[Trajectory]:
        """``n_samples`` trajectories per task, task-major (see AgentLoop.run_many), started once the
        engine's weights are at least ``min_version``."""
        if self.engine.weight_version < min_version:
            if self.restarted and not self.weights_received:
                raise WeightsBehindError(f"this rollout worker was restarted and holds weights of version "
                                         f"{self.engine.weight_version}; version {min_version} was asked for")
            async with self._new_weights:
                await self._new_weights.wait_for(lambda: self.engine.weight_version >= min_version)
        self._count(len(tasks) * n_samples)
        try:
            return await self.loop.run_many(tasks, n_samples, temperature, use_tools, seed=seed)
        finally:
            self._count(-len(tasks) * n_samples)

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Load the weights (``version``: the learner's policy version, default the previous + 1); episodes
        waiting for this version start, episodes in flight continue under it from their next turn."""
        return await self._loaded(self.engine.update_weights(named_tensors, version))

    async def _loaded(self, load: Awaitable[int]) -> int:
        """Await one weight load (any path); then episodes waiting for its version start."""
        self.weights_received += 1  # counted on arrival: an episode asking for this version may wait for it
        loaded = await load
        async with self._new_weights:
            self._new_weights.notify_all()
        return loaded

    # The GPU-to-GPU weight paths of a vLLM engine (cv_ray/weight_sync.py drives them).

    async def weight_endpoint(self) -> dict[str, Any]:
        return self.engine.weight_endpoint()

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        await self.engine.init_weight_transfer(init_info)

    async def receive_weights(self, update_info: dict[str, Any], version: int | None = None) -> int:
        return await self._loaded(self.engine.receive_weights(update_info, version))

    async def health(self) -> dict[str, Any]:
        busy = self.busy_s + (time.monotonic() - self._busy_since if self.in_flight > 0 else 0.0)
        return {**self.engine.describe(), "in_flight": self.in_flight, "busy_s": busy, "restarted": self.restarted,
                "node": ray.get_runtime_context().get_node_id()}


def split_evenly(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges covering ``n_items`` in ``n_parts`` parts whose sizes differ by at most 1."""
    base, extra = divmod(n_items, n_parts)
    ranges, start = [], 0
    for part in range(n_parts):
        end = start + base + (1 if part < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class Submission:
    """One group of samples sent to a worker by :meth:`RolloutGroup.submit`."""

    ref: ray.ObjectRef
    """Resolves to the trajectories (``ray.get`` raises if the worker died meanwhile)."""
    worker: int
    """Index of the worker it went to."""


class RolloutGroup(GroupShell):
    def __init__(self, model: ModelRef | str, cfg: RolloutConfig, sandbox_group: Any,
                 engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        # On GPUs each worker holds one bundle with all of its engine's GPUs (cv_ray/placement.py);
        # CPU workers need no placement group.
        placement = (rollout_placement(cfg.num_workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
                     if cfg.gpus_per_worker > 0 else None)
        self.actors = ActorGroup(
            RolloutWorker, cfg.num_workers, args=(ModelRef.of(model), cfg, sandbox_group, engine_factory),
            placement=placement, name="rollout workers",
            # Restarted by Ray when one dies, its calls in flight run again there (see the module docstring).
            options=lambda i: {"num_cpus": cfg.cpus_per_worker, "max_restarts": -1, "max_task_retries": -1})
        self._in_flight = [0] * cfg.num_workers

    def rollout(self, tasks: list[Task], n_samples: int | None = None, temperature: float | None = None,
                use_tools: bool = True, seed: int | None = None) -> tuple[list[Trajectory], dict[str, float]]:
        """Trajectories of every task (``n_samples`` each, default ``cfg.n_samples``), in task order, and batch metrics.

        ``temperature`` overrides ``cfg.temperature`` for this batch (0: greedy); ``use_tools=False``
        runs tool-free episodes (no tool schema in the prompt, one turn); ``seed`` seeds the sampling
        (per task, sample and turn; see ``AgentLoop.run_many``).
        """
        n_samples = n_samples or self.cfg.n_samples
        started = time.perf_counter()
        parts = split_evenly(len(tasks), len(self.actors))
        refs = self.actors.zip(lambda worker, part: worker.rollout.remote(tasks[part[0]:part[1]], n_samples,
                                                                         temperature, use_tools, seed), parts)
        trajectories = [t for chunk in self.actors.get(refs) for t in chunk]
        return trajectories, batch_metrics(trajectories, time.perf_counter() - started)

    def submit(self, task: Task, n_samples: int | None = None, min_version: int = 0,
               avoid: Collection[int] = (), seed: int | None = None) -> Submission:
        """Send one task's ``n_samples`` episodes (default ``cfg.n_samples``) to the worker with the fewest
        groups in flight (not one of ``avoid``, e.g. a restarting worker, unless all are), to start once
        its weights are at least ``min_version``, sampled from ``seed`` (see AgentLoop.run_many); returns
        at once. Call :meth:`settled` when the ref has been read (or has failed)."""
        workers = [i for i in range(len(self._in_flight)) if i not in avoid] or list(range(len(self._in_flight)))
        worker = min(workers, key=lambda i: self._in_flight[i])
        self._in_flight[worker] += 1
        ref = self.actors[worker].rollout.remote([task], n_samples or self.cfg.n_samples, seed=seed,
                                                 min_version=min_version)
        return Submission(ref, worker)

    def settled(self, submission: Submission) -> None:
        """``submission`` no longer counts towards its worker's load."""
        self._in_flight[submission.worker] -= 1

    def update_weights(self, weights: ray.ObjectRef | dict[str, torch.Tensor], version: int | None = None) -> list[int]:
        """Load one set of weights into every worker's engine; returns their new weight versions.

        ``weights``: an ObjectRef of ``{hf_name: tensor}`` (``LearnerGroup.gather_weights()``), or the
        dict itself (put in the object store once here). ``version``: the version the engines take
        (default: each engine's previous version + 1).
        """
        return self.actors.get(self.push_weights(weights, version))

    def push_weights(self, weights: ray.ObjectRef | dict[str, torch.Tensor], version: int | None = None,
                     workers: list[int] | None = None) -> list[ray.ObjectRef]:
        """Like :meth:`update_weights` without waiting: the refs of every worker's load (or of ``workers``' only)."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        targets = range(len(self.actors)) if workers is None else workers
        return [self.actors[i].update_weights.remote(ref, version) for i in targets]

    # The GPU-to-GPU weight paths (vLLM engines; cv_ray/weight_sync.py). They return refs: the learner's
    # side of a transfer must run while the engines wait in these calls.

    def weight_endpoints(self) -> list[dict[str, Any]]:
        """Per worker: its engine's receiver backend, GPU UUIDs and tensor-parallel size."""
        return self.actors.get(self.actors.each(lambda worker: worker.weight_endpoint.remote()))

    def init_weight_transfer(self, init_infos: list[dict[str, Any]]) -> list[ray.ObjectRef]:
        """Worker ``i`` joins learner rank 0's weight group with ``init_infos[i]`` (its ranks in it)."""
        return self.actors.zip(lambda worker, info: worker.init_weight_transfer.remote(info), init_infos)

    def receive_weights(self, update_info: dict[str, Any], version: int | None = None) -> list[ray.ObjectRef]:
        """Every engine loads what learner rank 0 sends (NCCL metadata, or IPC handles); refs of the new versions."""
        return self.actors.each(lambda worker: worker.receive_weights.remote(update_info, version))

    def health(self) -> list[dict[str, Any]]:
        return self.actors.get(self.actors.each(lambda worker: worker.health.remote()))

    def shutdown(self) -> None:
        self.actors.shutdown()
