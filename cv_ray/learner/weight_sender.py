"""Learner rank 0's end of the GPU-to-GPU weight paths (driven by cv_ray/weight_sync.py).

Only trainable parameters travel (``requires_grad``: with ``learner.freeze_vision`` the vision tower
stays out; the engines loaded it from the same checkpoint and it never changes), under their Hugging
Face names (``model.named_parameters()``), in the same order on every call.

* NCCL (:class:`NcclWeightSender`): rank 0 is rank 0 of one NCCL group with every vLLM worker of every
  engine (vLLM's own rendezvous, ``nccl_common.trainer_init``: a TCPStore at rank 0's address, then a
  ``PyNcclCommunicator``, the code vLLM's receivers join with). A sync broadcasts the tensors with
  vLLM's packed producer (``packed_nccl_broadcast_producer``: buckets of ``bucket_bytes``, two buffers
  in flight), which cuts the stream exactly as the receivers' packed consumer does from the metadata
  they were given (:func:`weight_metadata`). Under ZeRO-3 every rank walks the same gathers
  (``iter_full_weights`` on the rank's GPU); only rank 0 sends.
* CUDA IPC (:func:`ipc_update_info`): rank 0 and the engine share one GPU, and rank 0 holds every
  parameter whole (one rank, ZeRO 0-2). The engine's vLLM worker maps rank 0's parameters themselves
  through CUDA-IPC handles and copies them into its own: no staging copy at all. The parameters stay
  untouched until the engine has finished (the learner is idle while the driver syncs).

vLLM is imported only when a NCCL group is opened (GPU nodes install it: the ``vllm`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from cv_ray.learner.weights import full_shape

#: One tensor's metadata as vLLM's update info carries it: HF name, dtype name (``bfloat16``), shape.
ParamMeta = tuple[str, str, list[int]]


def weight_metadata(module: torch.nn.Module, trainable_only: bool) -> list[ParamMeta]:
    """``(name, dtype name, full shape)`` of the tensors a sync sends, in sending order (ZeRO-3
    partitioned parameters report their full shape)."""
    return [(name, str(p.dtype).removeprefix("torch."), full_shape(p))
            for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad or not trainable_only]


def update_info(metadata: Iterable[ParamMeta]) -> dict[str, list]:
    """vLLM's NCCL ``update_info`` (``NCCLWeightTransferUpdateInfo`` fields) for ``metadata``."""
    metadata = list(metadata)
    return {"names": [m[0] for m in metadata], "dtype_names": [m[1] for m in metadata],
            "shapes": [list(m[2]) for m in metadata]}


def payload_bytes(metadata: Iterable[ParamMeta]) -> int:
    """Bytes of the tensors ``metadata`` describes (what one receiver gets per sync)."""
    total = 0
    for _, dtype_name, shape in metadata:
        numel = 1
        for size in shape:
            numel *= int(size)
        total += numel * getattr(torch, dtype_name).itemsize
    return total


def checked(tensors: Iterable[tuple[str, torch.Tensor]], metadata: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors``, each checked against the metadata the receivers were sent: both sides cut the packed
    stream from it, so a difference would hang the broadcast or load garbage; this names it instead."""
    count = 0
    for name, tensor in tensors:
        if count >= len(metadata):
            raise ValueError(f"weight sender: more tensors than the {len(metadata)} announced; first extra {name!r}")
        expected = metadata[count]
        got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        if got != (expected[0], expected[1], list(expected[2])):
            raise ValueError(f"weight sender: tensor {count} is {got}, the receivers expect {expected}")
        count += 1
        yield name, tensor
    if count != len(metadata):
        raise ValueError(f"weight sender: sent {count} tensors, the receivers expect {len(metadata)}")


class NcclWeightSender:
    """Rank 0 of the NCCL weight group (see the module docstring)."""

    def __init__(self, master_address: str, master_port: int, world_size: int, bucket_bytes: int,
                 num_buffers: int = 2) -> None:
        """Open the group's TCP store at ``master_address:master_port`` and join as rank 0 of
        ``world_size``; returns once every engine worker has joined (they must be joining meanwhile)."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.bucket_bytes = bucket_bytes
        self.num_buffers = num_buffers
        self.group = trainer_init({"master_address": master_address, "master_port": master_port,
                                   "world_size": world_size})

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]], metadata: list[ParamMeta]) -> int:
        """Broadcast ``tensors`` (on this rank's GPU, in ``metadata`` order) to every receiver; returns
        the bytes sent. The receivers must be in their ``update_weights`` call meanwhile."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iterator=checked(tensors, metadata), group=self.group, src=0,
                                       post_iter_func=lambda item: item[1], buffer_size_bytes=self.bucket_bytes,
                                       num_buffers=self.num_buffers)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the learner may touch its parameters once this returns
        return payload_bytes(metadata)

    def close(self) -> None:
        self.group.destroy()


def ipc_update_info(module: torch.nn.Module, gpu_uuid: str, trainable_only: bool = True
                    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """vLLM's IPC ``update_info`` with one handle per parameter of ``module``, pointing at the parameter's
    own memory on the GPU ``gpu_uuid`` (no copy; the parameters must stay put until the engine has
    finished the update), and the exported tensors, which the caller keeps referenced until then (an
    export must outlive its import). Handles are ``reduce_tensor``'s arguments, which vLLM's receiver
    rebuilds with its own device index."""
    names, dtype_names, shapes, handles, exported = [], [], [], [], []
    for name, param in module.named_parameters(remove_duplicate=False):
        if trainable_only and not param.requires_grad:
            continue
        if getattr(param, "ds_numel", param.numel()) != param.numel():
            raise ValueError(f"{name} is partitioned (ZeRO-3): CUDA IPC shares whole parameters; use "
                             "learner.zero_stage <= 2 or rollout.vllm.weight_sync=nccl / object_store")
        tensor = param.detach()
        if not tensor.is_contiguous():
            raise ValueError(f"{name} is not contiguous; CUDA IPC shares parameters as they lie")
        _rebuild, args = reduce_tensor(tensor)
        exported.append(tensor)
        names.append(name)
        dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        handles.append({gpu_uuid: args})
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}, exported
