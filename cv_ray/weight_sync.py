"""The weight push: how the learner's new weights reach every rollout engine after an update.

The driver builds one from both groups and calls it in the RL step's weight-push phase::

    weight_sync = make_weight_sync(cfg.rollout, learner, groups.rollout)   # the path; set up once
    metrics = weight_sync.sync()            # after each update: weights/bytes, weights/sync_s, weights/path/<p>
    push = weight_sync.start(version)       # the asynchronous loop: the engines' loads as refs, not awaited

Only trainable parameters travel (``requires_grad``; with ``learner.freeze_vision`` the vision tower
never changes, and the engines loaded it from the same checkpoint as the learner). The path is
``rollout.vllm.weight_sync`` (``cv_ray.config.weight_sync_path`` resolves ``auto`` from both groups'
placement; ``check_weight_sync`` refuses impossible explicit choices before any actor starts):

* ``object_store`` (the CPU default, and the HF engine's only path): learner rank 0 gathers the
  tensors to CPU into Ray's object store once; every worker's engine loads the same ref (vLLM: copies
  to its GPUs, shared with its workers through CUDA IPC).
* ``nccl``: learner rank 0 and every vLLM worker of every engine form one NCCL group (vLLM's own
  rendezvous; rank 0 is the learner, engine ``i``'s workers follow at ``rank_offset`` 1 + the GPUs of
  the engines before it). A sync runs every engine's ``receive_weights`` (paused, in vLLM's NCCL
  receiver) while the learner ranks walk their gathers and rank 0 broadcasts the packed buckets:
  GPU to GPU, nothing through CPU. OpenRLHF and verl push weights the same way (one broadcast from
  trainer rank 0, the engines' workers at rank offsets behind it).
* ``ipc``: the engines share learner rank 0's GPU (``experiment=single_gpu``); rank 0 exports CUDA-IPC
  handles of its own parameters and the engines' vLLM workers copy straight from them.

Timings and sizes are returned as metrics (``weights/*``) so every step logs what its push cost.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from cv_ray.learner.weight_sender import ParamMeta, payload_bytes, update_info
from cv_ray.rollout.config import RolloutConfig

#: vLLM's packed NCCL transfer keeps this many buckets in flight (both sides must agree).
NCCL_BUFFERS = 2


def payload_metrics(path: str, metadata: Sequence[ParamMeta], engines: int, **parts: float) -> dict[str, float]:
    """What a push sends, whether or not it is awaited: bytes and tensors of one engine's payload, the
    engines, the path taken (``weights/path/<path>`` = 1) and the seconds of its parts (``weights/<part>``)."""
    metrics = {"weights/bytes": float(payload_bytes(metadata)), "weights/tensors": float(len(metadata)),
               "weights/engines": float(engines), f"weights/path/{path}": 1.0}
    metrics.update({f"weights/{key}": value for key, value in parts.items()})
    return metrics


def sync_metrics(path: str, metadata: Sequence[ParamMeta], engines: int, seconds: float,
                 versions: Sequence[int], **parts: float) -> dict[str, float]:
    """The metrics of one awaited sync: :func:`payload_metrics`, wall seconds and throughput, and the
    engines' new weight version (they must agree)."""
    if len(set(versions)) > 1:
        raise RuntimeError(f"rollout engines report different weight versions after a sync: {list(versions)}")
    metrics = payload_metrics(path, metadata, engines, **parts)
    metrics["weights/sync_s"] = seconds
    metrics["weights/gb_per_s"] = metrics["weights/bytes"] / seconds / 1e9 if seconds > 0 else 0.0
    if versions:
        metrics["weights/version"] = float(versions[0])
    return metrics


def push_metrics(sync: WeightSync, push: Push, version: int) -> dict[str, float]:
    """The metrics of a push started and not awaited (the asynchronous loop): :func:`payload_metrics`, the
    version, and the seconds until the engines' loads were issued (``weights/issue_s``); the loads
    themselves overlap the next step's collection."""
    return {**payload_metrics(sync.path, sync.metadata, sync.engines, **push.parts),
            "weights/issue_s": push.issued - push.started, "weights/version": float(version)}


def nccl_layout(tensor_parallel_sizes: Sequence[int], master_address: str, master_port: int,
                bucket_bytes: int) -> tuple[int, list[dict[str, Any]]]:
    """The NCCL weight group's size and each engine's ``init_info`` (vLLM's ``NCCLWeightTransferInitInfo``).

    Learner rank 0 is rank 0; engine ``i``'s worker ``w`` is rank ``rank_offset_i + w`` (vLLM adds the
    worker's rank within its engine), ``rank_offset_i`` = 1 + the GPUs of engines ``0..i-1``.
    ``packed`` with the bucket size and buffer count the sender uses: both sides cut the stream alike.
    """
    world_size = 1 + sum(tensor_parallel_sizes)
    infos, offset = [], 1
    for tp in tensor_parallel_sizes:
        infos.append({"master_address": master_address, "master_port": master_port, "rank_offset": offset,
                      "world_size": world_size, "packed": True, "packed_buffer_size_bytes": bucket_bytes,
                      "packed_num_buffers": NCCL_BUFFERS})
        offset += tp
    return world_size, infos


def wait_all(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """``ray.get`` of every ref, in order, raising the first failure as soon as it happens (a transfer
    whose other side failed would otherwise wait in NCCL forever)."""
    results: dict[ray.ObjectRef, Any] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            results[ref] = ray.get(ref)
    return [results[ref] for ref in refs]


@dataclass
class Push:
    """A sync under way (:meth:`WeightSync.start`): what is still running, and what it cost so far."""

    loads: list[ray.ObjectRef]
    """Each engine's load; resolves to its new weight version."""
    sends: list[ray.ObjectRef] = field(default_factory=list)
    """The learner's side still running meanwhile (the NCCL broadcast)."""
    started: float = 0.0
    """``time.perf_counter()`` when the sync began."""
    issued: float = 0.0
    """When the engines' loads were issued (the learner's part before it: gather or export)."""
    parts: dict[str, float] = field(default_factory=dict)
    """Seconds of the parts done before the loads were issued (``gather_s``, ``export_s``)."""

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [*self.loads, *self.sends]


class WeightSync(abc.ABC):
    """One weight path between a LearnerGroup and a RolloutGroup (the driver's weight-push phase).

    :meth:`sync` sends and waits (the synchronous step); :meth:`start` sends without waiting for the
    engines (the asynchronous loop, which routes the refs through its own wait); :meth:`restore` sends
    the newest weights to restarted workers only.
    """

    path: str

    def __init__(self, learner: Any, rollout: Any, bucket_bytes: int) -> None:
        self.learner, self.rollout, self.bucket_bytes = learner, rollout, bucket_bytes
        self.metadata: list[ParamMeta] = []
        self.engines = 0

    def setup(self) -> None:
        """Once, before the first sync: what is sent (and, per path, the connection)."""
        self.metadata = [tuple(m) for m in self.learner.weight_metadata()]
        if not self.metadata:
            raise ValueError("the learner has no trainable parameter to send (is everything frozen?)")
        self.engines = len(self.rollout.health())

    @abc.abstractmethod
    def start(self, version: int | None = None) -> Push:
        """Begin sending the learner's current trainable weights to every engine; each takes ``version``
        (default: its previous version + 1). Returns once the engines' loads are issued."""

    def sync(self, version: int | None = None) -> dict[str, float]:
        """Send and wait: returns the sync's metrics (``weights/*``)."""
        push = self.start(version)
        results = wait_all(push.refs)
        done = time.perf_counter()
        parts = {**push.parts, "load_s": done - push.issued} if push.parts else {}
        return sync_metrics(self.path, self.metadata, self.engines, done - push.started,
                            results[:len(push.loads)], **parts)

    def restore(self, workers: Sequence[int], version: int) -> list[ray.ObjectRef]:
        """Send the newest weights, as ``version``, to ``workers`` only (restarted by Ray from their
        checkpoint); refs of their loads."""
        raise RuntimeError(f"the {self.path} weight path cannot bring a restarted rollout worker up to date "
                           f"(it would have to rejoin the transfer group): resume the run from its last "
                           f"checkpoint, or use rollout.vllm.weight_sync=object_store")


class ObjectStoreSync(WeightSync):
    path = "object_store"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.newest: ray.ObjectRef | None = None
        """The last weights gathered (in the object store): what a restarted worker is given."""

    def start(self, version: int | None = None) -> Push:
        started = time.perf_counter()
        self.newest = self.learner.gather_weights(trainable_only=True)
        issued = time.perf_counter()
        return Push(self.rollout.push_weights(self.newest, version), started=started, issued=issued,
                    parts={"gather_s": issued - started})

    def restore(self, workers: Sequence[int], version: int) -> list[ray.ObjectRef]:
        if self.newest is None:
            raise RuntimeError("no weights were sent yet: nothing to restore a worker to")
        return self.rollout.push_weights(self.newest, version, list(workers))


class NcclSync(WeightSync):
    path = "nccl"

    def setup(self) -> None:
        super().setup()
        endpoints = self.rollout.weight_endpoints()
        wrong = [i for i, e in enumerate(endpoints) if e["backend"] != "nccl"]
        if wrong:
            raise RuntimeError(f"rollout workers {wrong} were not started with vLLM's NCCL receiver "
                               f"(rollout.vllm.weight_sync must be nccl when the engines start)")
        address, port = self.learner.weight_sender_address()
        world_size, infos = nccl_layout([e["tensor_parallel_size"] for e in endpoints], address, port,
                                        self.bucket_bytes)
        # Everyone must be in the rendezvous at once: the engines' calls and rank 0's run concurrently.
        wait_all([*self.rollout.init_weight_transfer(infos),
                  self.learner.open_weight_sender(address, port, world_size, self.bucket_bytes)])
        self.update_info = update_info(self.metadata)

    def start(self, version: int | None = None) -> Push:
        started = time.perf_counter()
        receiving = self.rollout.receive_weights(self.update_info, version)  # each engine waits in NCCL
        sending = self.learner.broadcast_weights(self.metadata)
        return Push(receiving, sending, started=started, issued=started)


class IpcSync(WeightSync):
    path = "ipc"

    def setup(self) -> None:
        super().setup()
        learner_gpu = self.learner.gpu_uuid()
        apart = [(i, e["gpu_uuids"]) for i, e in enumerate(self.rollout.weight_endpoints())
                 if e["backend"] != "ipc" or e["gpu_uuids"] != [learner_gpu]]
        if apart:
            raise RuntimeError(f"rollout.vllm.weight_sync=ipc needs every engine on learner rank 0's GPU "
                               f"({learner_gpu}); engines elsewhere (worker, GPUs): {apart}. Fix: place them "
                               f"together (experiment=single_gpu) or set rollout.vllm.weight_sync=nccl")

    def start(self, version: int | None = None) -> Push:
        started = time.perf_counter()
        handles = self.learner.ipc_weight_handles()
        issued = time.perf_counter()
        return Push(self.rollout.receive_weights(handles, version), started=started, issued=issued,
                    parts={"export_s": issued - started})


SYNCS: dict[str, type[WeightSync]] = {"object_store": ObjectStoreSync, "nccl": NcclSync, "ipc": IpcSync}


def make_weight_sync(rollout_cfg: RolloutConfig, learner: Any, rollout: Any) -> WeightSync:
    """The weight path ``rollout_cfg`` names (resolved: ``cv_ray.config.resolve_weight_sync``), between
    ``learner`` (a LearnerGroup) and ``rollout`` (a RolloutGroup started with ``rollout_cfg``), set up."""
    path = rollout_cfg.vllm.weight_sync if rollout_cfg.engine == "vllm" else "object_store"
    if path not in SYNCS:
        raise ValueError(f"weight path {path!r}: resolve rollout.vllm.weight_sync first "
                         "(cv_ray.config.resolve_weight_sync)")
    sync = SYNCS[path](learner, rollout, rollout_cfg.vllm.weight_bucket_mb * 2**20)
    sync.setup()
    return sync
