"""Stand-ins for the parts of vLLM that need a GPU, wrapped around vLLM's own CPU-side code.

vLLM's ``AsyncLLM`` starts an engine-core process whose executor needs a GPU (its workers, the forward
pass, CUDA memory). :class:`CpuEngineCoreClient` takes the place of that process's client, so the
engine's ``AsyncLLM`` (vllm==0.33.0 from .cache/vllm-api) is vLLM's real one and everything a request
or a weight update passes through in it is vLLM's code:

* ``AsyncEngineArgs(**kwargs).create_engine_config()``: the engine's arguments, validated;
* ``AsyncLLM`` itself: ``generate`` (the per-request output collector), the input processor
  (``TokensPrompt`` + images -> expanded ids by vLLM's multimodal processor, ``SamplingParams``
  checked, ``bad_words`` -> token ids), the output processor (log-prob containers, finish reasons, the
  per-token ``weight_versions`` spans), ``pause_generation`` / ``resume_generation``, the
  weight-transfer calls and ``collective_rpc``;
* the client's own utility methods (``AsyncMPClient.pause_generation_async``, ``collective_rpc_async``,
  ...), and vLLM's msgpack serializer on every request and utility call (``add_request_async`` and
  ``_call_utility_async`` encode and decode what they carry, as the ZMQ transport does);
* in the "worker": vLLM's ``Worker`` weight-update session methods (``gpu_worker.Worker.start_weight_update``
  ... borrowed as they are), the receiver ``WeightTransferEngineFactory`` builds for the configured
  backend (IPC or NCCL) and the model class's own ``load_weights`` with layerwise reloading, on vLLM's
  real model built on CPU.

Only these are stood in, because they need a GPU:

* the engine core's scheduler and forward pass (:class:`CpuEngineCore`): requests run with continuous
  batching, one token per running request per step: the request's :class:`ScriptedTurn` tokens, then
  its first stop token, with log-probs ``-0.25 * (k + 1)``; each step is labelled with the weight
  version set through ``set_weight_version`` (``default`` before), as ``EngineCore`` labels its
  steps. ``pause_generation(mode="keep")`` freezes the running requests until ``resume_scheduler``
  (vLLM's PAUSED_ALL). The core records every step's batch, so tests can see who ran with whom;
* CUDA IPC: :class:`FakeCudaIpc` exports CPU tensors with the argument layout torch's
  ``reduce_tensor`` gives a CUDA tensor (15 arguments: device index at [6], handle at [7]), rebuilds
  them from that layout, and poisons the memory once the sender drops its tensor (a CUDA-IPC view
  does not keep the sender's block alive);
* NCCL and CUDA streams, for the NCCL weight path: :class:`FakeNcclLink` (tests/rollout/test_vllm_weight_sync.py).

tests/rollout/test_vllm_engine.py checks that the stand-in client's methods keep the signatures of
vLLM's ``AsyncMPClient`` and that every ``AsyncLLM`` method the engine calls exists there.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch


class FakeCudaIpc:
    """CUDA-IPC export and import for CPU tensors, in torch's CUDA argument layout (needs no GPU)."""

    def __init__(self, uuid: str = "GPU-standin-0") -> None:
        self.uuid = uuid
        self.exported: dict[bytes, torch.Tensor] = {}
        self.rebuilt_on: list[int | None] = []

    def reduce_tensor(self, tensor: torch.Tensor):
        """``torch.multiprocessing.reductions.reduce_tensor`` as it answers for a CUDA tensor."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        handle = f"cuda-ipc-{len(self.exported)}".encode()
        self.exported[handle] = tensor
        storage = tensor._typed_storage()
        # A CUDA-IPC mapping does not keep the sender's memory alive: once the sender drops its tensor,
        # the caching allocator hands the block to someone else. Model that by filling it with NaNs.
        weakref.finalize(tensor, tensor.untyped_storage().fill_, 0xFF)
        args = (type(tensor), tensor.size(), tensor.stride(), tensor.storage_offset(), type(storage), tensor.dtype,
                0, handle, storage.nbytes(), 0, tensor.requires_grad, b"ref-counter", 0, b"event", False)
        return rebuild_cuda_tensor, args

    def rebuild_cuda_tensor(self, tensor_cls, size, stride, offset, storage_cls, dtype, device, handle,
                            *_rest) -> torch.Tensor:
        """The receiver's view of the exported memory (shared, like a CUDA-IPC mapping)."""
        source = self.exported.pop(bytes(handle))  # from here on only the sender keeps its tensor alive
        assert dtype == source.dtype, (dtype, source.dtype)
        self.rebuilt_on.append(device)
        # A view on the storage that does not reference the sender's tensor object (as a mapping would not).
        return torch.empty(0, dtype=dtype).set_(source.untyped_storage(), offset, tuple(size), tuple(stride))


# ---------------------------------------------------------------------------------------- worker


def _worker_class():
    """A worker with vLLM's own weight-update session methods (``vllm/v1/worker/gpu_worker.py``)."""
    from vllm.v1.worker.gpu_worker import Worker

    class CpuWorker:
        """Holds vLLM's real model on CPU and the receiver vLLM's factory builds for the configured backend;
        its weight-transfer methods are ``gpu_worker.Worker``'s, unchanged."""

        init_weight_transfer_engine = Worker.init_weight_transfer_engine
        start_weight_update = Worker.start_weight_update
        _start_weight_update = Worker._start_weight_update
        update_weights = Worker.update_weights
        finish_weight_update = Worker.finish_weight_update
        _check_weight_transfer_engine = Worker._check_weight_transfer_engine
        get_draft_model = Worker.get_draft_model

        def __init__(self, vllm_config, model: torch.nn.Module, device: torch.device) -> None:
            from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

            self.vllm_config = vllm_config
            self.rank = 0
            self.speculative_config = None
            self.model = model
            self.model_runner = SimpleNamespace(get_draft_model=lambda: None, reset_lora_state=lambda: None,
                                                get_model=lambda: model)
            self.weight_transfer_engine = WeightTransferEngineFactory.create_engine(
                vllm_config.weight_transfer_config, vllm_config, device, model)
            self._weight_update_active = False
            self._weight_update_is_draft = False

    return CpuWorker


# ------------------------------------------------------------------------------------ engine core


@dataclass
class ScriptedTurn:
    """What the stand-in forward pass samples for one request: ``tokens``, then the request's first stop
    token. A ``held`` turn, once its tokens are out, keeps sampling ``filler`` in every step that some
    other request also runs, and ends only after :meth:`CpuEngineCore.release` (a long turn whose end
    the test decides)."""

    tokens: Sequence[int] = (40, 41, 42, 43)
    held: bool = False
    filler: int = 39


class _Running:
    def __init__(self, request, turn: ScriptedTurn) -> None:
        self.request = request
        self.turn = turn
        self.emitted = 0

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(self.request.prompt_token_ids)

    def waiting_for_release(self) -> bool:
        return self.turn.held and self.emitted >= len(self.turn.tokens)


class CpuEngineCore:
    """vLLM's engine core with its scheduler and forward pass stood in (see the module docstring).

    ``script(request) -> ScriptedTurn`` decides each request's tokens (default: 40..43 then the stop).
    Utility methods carry ``EngineCore``'s names and arguments; the client reaches them by name, as the
    real engine-core process does.
    """

    def __init__(self, worker) -> None:
        self.worker = worker
        self.script: Callable[[Any], ScriptedTurn] = lambda request: ScriptedTurn()
        self.running: list[_Running] = []
        self.added: list = []
        """Every ``EngineCoreRequest`` received (after vLLM's input processing and the serializer)."""
        self.steps: list[tuple[str, list[tuple[int, ...]]]] = []
        """Per step: its weight-version label and the prompts of the requests that ran in it."""
        self.events: list[str] = []
        self.version = "default"
        self.paused = False
        self.released = False
        self._changed = asyncio.Event()

    # -- requests and steps ---------------------------------------------------------------------

    def add_request(self, request) -> None:
        self.added.append(request)
        self.running.append(_Running(request, self.script(request)))
        self._changed.set()

    def abort_requests(self, request_ids: list[str]) -> None:
        self.running = [r for r in self.running if r.request.request_id not in set(request_ids)]

    def ran(self, prompt: Sequence[int]) -> bool:
        """Whether the request with ``prompt`` has run in a step yet."""
        return any(tuple(prompt) in keys for _, keys in self.steps)

    async def until_ran(self, prompt: Sequence[int], timeout_s: float = 60.0) -> None:
        """Wait until the request with ``prompt`` has run in a step (vLLM's input processing may add it late)."""
        async def poll() -> None:
            while not self.ran(prompt):
                await asyncio.sleep(0.001)

        await asyncio.wait_for(poll(), timeout_s)

    def release(self) -> None:
        """Let every held turn end at its next step."""
        self.released = True
        self._changed.set()

    def _emitting(self) -> list[_Running]:
        free = [r for r in self.running if not r.waiting_for_release()]
        if self.released or free:
            return list(self.running)
        return []  # only held turns left: they wait for company or for release

    async def next_outputs(self):
        """The outputs of the next step, once some request can run (``get_output_async``)."""
        from vllm.v1.engine import EngineCoreOutputs

        while True:
            await asyncio.sleep(0)  # tasks woken by the last step's outputs may submit their next turn first
            emitting = [] if self.paused else self._emitting()
            if emitting:
                outputs = [self._emit(r) for r in emitting]
                self.steps.append((self.version, [r.key for r in emitting]))
                self.running = [r for r in self.running if not any(o.finished for o in outputs
                                                                   if o.request_id == r.request.request_id)]
                return EngineCoreOutputs(outputs=outputs, weight_version=self.version)
            self._changed.clear()
            await self._changed.wait()

    def _emit(self, r: _Running):
        from vllm.v1.engine import EngineCoreOutput, FinishReason
        from vllm.v1.outputs import LogprobsLists

        params = r.request.sampling_params
        stops = list(params.stop_token_ids or [])
        if r.emitted < len(r.turn.tokens):
            token = r.turn.tokens[r.emitted]
        elif r.turn.held and not self.released:
            token = r.turn.filler
        else:
            token = stops[0] if stops else r.turn.filler
        k = r.emitted
        r.emitted += 1
        finish, stop_reason = None, None
        if token in stops:
            finish, stop_reason = FinishReason.STOP, token
        elif r.emitted >= params.max_tokens:
            finish = FinishReason.LENGTH
        logprobs = LogprobsLists(np.array([[token]]), np.array([[-0.25 * (k + 1)]], dtype=np.float32), np.array([0]))
        return EngineCoreOutput(r.request.request_id, [token], logprobs, finish_reason=finish, stop_reason=stop_reason)

    # -- utilities (EngineCore's names) ---------------------------------------------------------

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        if mode != "keep":
            raise ValueError(f"the stand-in engine core pauses in 'keep' mode only, not {mode!r}")
        # vLLM's PAUSED_ALL: nothing is scheduled; with clear_cache the prefix cache (the running
        # requests' KV included: they are preempted and recomputed on resume) and the encoder cache go.
        self.paused = True
        self.events.append(f"pause({mode}, clear_cache={clear_cache})")

    def resume_scheduler(self) -> None:
        self.paused = False
        self.events.append("resume")
        self._changed.set()

    def is_scheduler_paused(self) -> bool:
        return self.paused

    def set_weight_version(self, weight_version: str) -> None:
        self.version = weight_version
        self.events.append(f"version({weight_version})")

    def get_weight_version(self) -> str:
        return self.version

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append("reset_prefix_cache")
        return True

    def reset_encoder_cache(self) -> None:
        self.events.append("reset_encoder_cache")

    def reset_mm_cache(self) -> None:
        self.events.append("reset_mm_cache")

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        info = kwargs.get("update_info")
        self.events.append(f"{method}({len(info['names'])})" if isinstance(info, dict) else method)
        return [getattr(self.worker, method)(*args, **kwargs)]


class CpuEngineCoreClient:
    """What ``EngineCoreClient.make_async_mp_client`` returns, for an engine core in this process.

    The public methods are ``AsyncMPClient``'s own (they reach the engine core through
    ``_call_utility_async``); only the transport under them is stood in, and it passes every message
    through vLLM's msgpack encoder and decoder as the ZMQ transport does. Class attributes configure
    the stand-ins: ``distributed`` (tests/rollout/vllm_api.CpuDistributed) and ``ipc_device`` (the
    device the IPC receiver thinks its model is on; its index lands at ``args[6]``).
    """

    distributed = None
    ipc_device = torch.device("cuda", 3)

    def __init__(self, vllm_config, executor_class=None, log_stats: bool = False, client_addresses=None,
                 client_count: int = 1, client_index: int = 0, renderer=None) -> None:
        from transformers import AutoModelForImageTextToText
        from vllm_api import cpu_vllm_model

        hf = AutoModelForImageTextToText.from_pretrained(vllm_config.model_config.model)
        model = cpu_vllm_model(vllm_config, self.distributed, {n: p.detach().clone() for n, p in hf.named_parameters()})
        backend = vllm_config.weight_transfer_config.backend
        device = self.ipc_device if backend == "ipc" else torch.device("cpu")
        self.core = CpuEngineCore(_worker_class()(vllm_config, model, device))
        self.client_index = client_index
        self.core_engine = b"\x00\x00"
        self.core_engines = [self.core_engine]
        self.engine_ranks_managed = [0]
        self.resources = SimpleNamespace(engine_dead=False)
        self.closed = False

    # -- the transport (stood in) ---------------------------------------------------------------

    async def _call_utility_async(self, method: str, *args, engine) -> Any:
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        method, args = MsgpackDecoder().decode(MsgpackEncoder().encode((method, args)))
        return getattr(self.core, method)(*args)

    async def add_request_async(self, request) -> None:
        from vllm.v1.engine import EngineCoreRequest
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        request.client_index = self.client_index
        self.core.add_request(MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(request)))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids:
            self.core.abort_requests(list(request_ids))

    async def get_output_async(self):
        return await self.core.next_outputs()

    def dp_engines_running(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        self.closed = True


def _borrow_client_methods() -> None:
    """Give CpuEngineCoreClient vLLM's ``AsyncMPClient`` methods that sit above the transport."""
    from vllm.v1.engine.core_client import AsyncMPClient

    for name in BORROWED_CLIENT_METHODS:
        setattr(CpuEngineCoreClient, name, getattr(AsyncMPClient, name))


#: AsyncMPClient's methods the stand-in client uses as they are (they call ``_call_utility_async``).
BORROWED_CLIENT_METHODS = (
    "call_utility_async", "call_utility_all_async", "call_utility_consensus_async", "get_supported_tasks_async",
    "pause_generation_async", "resume_scheduler_async", "is_scheduler_paused_async", "reset_mm_cache_async",
    "reset_prefix_cache_async", "reset_encoder_cache_async", "set_weight_version_async", "get_weight_version_async",
    "collective_rpc_async",
)

#: The transport methods the stand-in replaces; their signatures must stay AsyncMPClient's.
STOOD_IN_CLIENT_METHODS = ("_call_utility_async", "add_request_async", "abort_requests_async", "get_output_async",
                           "dp_engines_running", "shutdown")


def install(monkeypatch, distributed) -> list[CpuEngineCoreClient]:
    """Make ``AsyncLLM`` start a :class:`CpuEngineCoreClient` instead of an engine-core process; returns
    the list the clients it makes are appended to."""
    from vllm.v1.engine.core_client import EngineCoreClient

    _borrow_client_methods()
    made: list[CpuEngineCoreClient] = []

    def make_async_mp_client(*args, **kwargs) -> CpuEngineCoreClient:
        made.append(CpuEngineCoreClient(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(CpuEngineCoreClient, "distributed", distributed)
    monkeypatch.setattr(EngineCoreClient, "make_async_mp_client", staticmethod(make_async_mp_client))
    return made


# ------------------------------------------------------------------------------------------- NCCL


class FakeNcclLink:
    """NCCL broadcast between threads of one process, with ``PyNcclCommunicator.broadcast``'s signature.

    ``end(rank)`` gives rank ``rank``'s communicator; the sender (rank 0) hands every receiver a copy of
    each tensor it broadcasts, and a receiver blocks until its copy arrives, then fills its buffer (a
    broadcast is a rendezvous: sizes must agree, as NCCL's do). Only the transport is stood in: vLLM's
    packed producer and consumer, which cut the stream into chunks on both sides, run unchanged.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.queues = {rank: queue.Queue() for rank in range(1, world_size)}
        self.sent_bytes = 0
        self.broadcasts = 0
        self._lock = threading.Lock()

    def end(self, rank: int) -> SimpleNamespace:
        return SimpleNamespace(broadcast=lambda tensor, src=0, stream=None: self._broadcast(rank, tensor, src),
                               destroy=lambda: None, rank=rank, world_size=self.world_size)

    def _broadcast(self, rank: int, tensor: torch.Tensor, src: int) -> None:
        assert src == 0, "cv_ray's weight path has one sender, rank 0"
        if rank == src:
            with self._lock:
                self.sent_bytes += tensor.numel() * tensor.element_size()
                self.broadcasts += 1
            for receiver in self.queues.values():
                receiver.put(tensor.detach().clone())
            return
        received = self.queues[rank].get(timeout=self.timeout_s)
        if received.shape != tensor.shape or received.dtype != tensor.dtype:
            raise RuntimeError(f"NCCL broadcast mismatch on rank {rank}: sender {tuple(received.shape)} "
                               f"{received.dtype}, receiver {tuple(tensor.shape)} {tensor.dtype}")
        tensor.copy_(received)


class FakeCudaStreams:
    """The CUDA stream and event API that vLLM's packed NCCL producer and consumer call, on a CPU
    (every operation is synchronous there, so waiting is a no-op)."""

    class Stream:
        def synchronize(self) -> None:
            pass

        def wait_event(self, event) -> None:
            pass

    class Event:
        def record(self, stream=None) -> None:
            pass

    @classmethod
    def install(cls, monkeypatch) -> None:
        import contextlib

        from vllm.distributed.weight_transfer import packed_tensor

        monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: tuple(cls.Stream() for _ in range(n)))
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cls.Stream())
        monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: cls.Stream())
        monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
        monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args, **kwargs: None)
        monkeypatch.setattr(torch, "Event", cls.Event)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


# ---------------------------------------------------------------------------------------- fixture


@pytest.fixture
def make_engine(vllm_api, distributed, tiny_qwen25, monkeypatch):
    """``make_engine(weight_sync="object_store")``: a VLLMEngine over vLLM's AsyncLLM and the stand-in
    engine core, CUDA IPC stood in by FakeCudaIpc (the engine's GPU copies stay on CPU). Returns
    ``(engine, core, ipc)``. Every engine is shut down after the test; run each test's async part in
    one ``asyncio.run`` (AsyncLLM's output handler lives on the loop of its first request)."""
    from vllm.distributed.weight_transfer import ipc_engine

    from cv_ray.rollout import vllm_engine
    from cv_ray.rollout.config import RolloutConfig, VLLMConfig

    ipc = FakeCudaIpc()
    clients = install(monkeypatch, distributed)
    monkeypatch.setattr(vllm_engine, "reduce_tensor", ipc.reduce_tensor)
    monkeypatch.setattr(ipc_engine, "rebuild_cuda_tensor", ipc.rebuild_cuda_tensor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=ipc.uuid))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(vllm_engine.VLLMEngine, "_weight_targets", lambda self: [(ipc.uuid, torch.device("cpu"))])
    # The engine sets vLLM's environment in os.environ; monkeypatch restores what was there before.
    for key in vllm_engine.vllm_launch(1).env:
        monkeypatch.delenv(key, raising=False)
    engines = []

    def make(weight_sync: str = "object_store"):
        cfg = RolloutConfig(engine="vllm", gpus_per_worker=1, max_turns=2, vllm=VLLMConfig(weight_sync=weight_sync))
        engines.append(vllm_engine.VLLMEngine.from_config(str(tiny_qwen25), cfg))
        return engines[-1], clients[-1].core, ipc

    yield make
    for engine in engines:
        engine.shutdown()
