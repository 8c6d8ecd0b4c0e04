"""Where each actor group's actors run, as pure functions: Ray bundles, strategy, bundle per actor, engine launch.

No Ray calls here: the groups (``cv_ray/rollout/rollout_worker.py``, ``cv_ray/learner/group.py``) turn
a :class:`GroupPlacement` into a placement group and scheduling strategies; tests check the plans as
data and against vLLM's own executor choice (tests/test_placement.py, tests/rollout/test_vllm_api.py).

Two rules and why:

* **Learner ranks are packed.** One bundle per rank in one placement group with ``PACK``, so the
  ranks of one torch.distributed group share as few nodes as the resources allow: ZeRO-3 gathers
  every parameter on every step, and a rank placed on another node turns those gathers into
  network traffic. Without a placement group Ray spreads the actors wherever there is room.
* **A vLLM engine with tensor parallelism runs its own workers** (``distributed_executor_backend=
  "mp"``). Inside a placement group vLLM otherwise picks its ``ray`` executor
  (``vllm/config/parallel.py``), which refuses any bundle with more than one GPU
  (``vllm/v1/executor/ray_utils.py``) and would schedule its workers apart from the rollout actor.
  Here the rollout actor holds one bundle with all ``tensor_parallel_size`` GPUs of its engine (a
  bundle is always on one node), Ray sets ``CUDA_VISIBLE_DEVICES`` to them, and vLLM's worker
  processes inherit it: worker *i* drives the actor's ``cuda:i``. That is also what the CUDA-IPC
  weight update needs: the actor copies each tensor to every GPU of its engine and hands each
  worker a handle on its own GPU (verl launches vLLM the same way; OpenRLHF instead gives vLLM's Ray
  executor 1-GPU bundles and bundle indices, which would leave the actor without the GPUs).

Fractional GPUs share a device: ``rollout.gpus_per_worker=0.5`` and ``learner.gpus_per_rank=0.5``
put one engine and one rank on one GPU (``experiment=single_gpu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupPlacement:
    """A placement group for one actor group, and the bundle each actor is scheduled into."""

    bundles: list[dict[str, float]]
    """Ray resource bundles, one per actor."""
    strategy: str
    """Ray placement strategy (``PACK``: as few nodes as fit, ``STRICT_PACK``: one node)."""
    actor_bundle: list[int]
    """Bundle index of actor ``i``."""
    actor_options: list[dict[str, float]]
    """``num_cpus`` / ``num_gpus`` of actor ``i`` (it takes its whole bundle)."""


@dataclass(frozen=True)
class VLLMLaunch:
    """How one vLLM engine is started inside its rollout actor."""

    engine_kwargs: dict[str, object] = field(default_factory=dict)
    """Extra ``vllm.LLM`` arguments (the executor backend)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment the actor sets before vLLM starts (vLLM's processes inherit it)."""


def _bundle(gpus: float, cpus: float) -> dict[str, float]:
    # Ray rejects zero-sized resources in a bundle: a CPU-only bundle has no GPU key.
    bundle = {"CPU": float(cpus)}
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    return bundle


def packed_group(n_actors: int, gpus_per_actor: float, cpus_per_actor: float) -> GroupPlacement:
    """One bundle per actor, packed (``PACK``): learner ranks, rollout workers."""
    if n_actors < 1:
        raise ValueError(f"an actor group needs at least one actor, got {n_actors}")
    if cpus_per_actor <= 0 and gpus_per_actor <= 0:
        raise ValueError("an actor needs some CPU or GPU in its bundle")
    bundles = [_bundle(gpus_per_actor, cpus_per_actor) for _ in range(n_actors)]
    options = [{"num_cpus": float(cpus_per_actor), "num_gpus": float(gpus_per_actor)} for _ in range(n_actors)]
    return GroupPlacement(bundles=bundles, strategy="PACK", actor_bundle=list(range(n_actors)), actor_options=options)


def learner_placement(num_ranks: int, gpus_per_rank: float, cpus_per_rank: float) -> GroupPlacement:
    """The learner group (SFT and RL alike): every rank in one ``PACK`` placement group."""
    return packed_group(num_ranks, gpus_per_rank, cpus_per_rank)


def rollout_placement(num_workers: int, gpus_per_worker: float, cpus_per_worker: float) -> GroupPlacement:
    """Rollout workers: one bundle per worker holding all GPUs of its engine (see the module docstring)."""
    return packed_group(num_workers, gpus_per_worker, cpus_per_worker)


def vllm_launch(tensor_parallel_size: int) -> VLLMLaunch:
    """Engine arguments and environment for a vLLM engine of ``tensor_parallel_size`` GPUs in one actor.

    * ``distributed_executor_backend="mp"`` when ``tensor_parallel_size > 1`` (module docstring); one
      GPU needs no executor choice (vLLM runs its ``uni`` executor for a world of one).
    * ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``: ``LLM.update_weights`` reaches the workers through
      ``collective_rpc``, whose msgpack encoder (``vllm/v1/serial_utils.py``) refuses the CUDA-IPC
      handles (a tensor class, a storage class, a dtype) unless this is set, and vLLM reads it when
      its processes start: set before the engine is built.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
    kwargs: dict[str, object] = {}
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    return VLLMLaunch(engine_kwargs=kwargs, env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
