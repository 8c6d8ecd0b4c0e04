"""Stand-ins for the parts of vLLM that need a GPU, wrapped around vLLM's own CPU-side code.

vLLM's offline ``LLM`` cannot start without a GPU (its workers, the forward pass, CUDA memory).
:class:`CpuLLM` stands in for it in tests/rollout/test_vllm_engine.py, and everything a request or a
weight update passes through on its way in is vLLM's real code (vllm==0.33.0 from .cache/vllm-api):

* ``EngineArgs(**kwargs).create_engine_config()``: the engine's arguments, validated;
* the input processor: ``TokensPrompt`` + images -> expanded ids (vLLM's multimodal processor),
  ``SamplingParams`` checked, ``bad_words`` -> token ids;
* the msgpack serializer of ``collective_rpc`` (``vllm/v1/serial_utils.py``), under the environment
  the engine set;
* the IPC weight receiver (``IPCWeightTransferEngine``: handle lookup by GPU UUID, device index put
  at ``args[6]``, ``rebuild_cuda_tensor(*args)``) and the model class's own ``load_weights`` with
  layerwise reloading, on vLLM's real model built on CPU;
* output containers: ``CompletionOutput`` / ``RequestOutput`` and vLLM's log-prob containers.

Only these are stood in, because they need a GPU:

* the forward pass: a request yields ``CpuLLM.script`` and then its first stop token, with
  log-probs ``-0.25 * (k + 1)``;
* CUDA IPC: :class:`FakeCudaIpc` exports CPU tensors with the argument layout torch's
  ``reduce_tensor`` gives a CUDA tensor (15 arguments: device index at [6], handle at [7]), rebuilds
  them from that layout, and poisons the memory once the sender drops its tensor (a CUDA-IPC view
  does not keep the sender's block alive);
* the worker's update-session bookkeeping, which mirrors ``vllm/v1/worker/gpu_worker.py`` (start
  refuses while a session is open; an error in the receiver closes it; finish without a session
  raises); an error in the serializer happens before any worker sees the call, as in vLLM.

tests/rollout/test_vllm_engine.py checks that every method the engine calls here exists on
``vllm.LLM`` with a matching signature, so the stand-in cannot drift from the API it replaces.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

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


class CpuLLM:
    """``vllm.LLM`` with vLLM's CPU-side code and a scripted forward pass (see the module docstring).

    Class attributes configure the stand-ins: ``ipc`` (a :class:`FakeCudaIpc`), ``distributed``
    (tests/rollout/vllm_api.CpuDistributed), ``receiver_device`` (the device the receiver thinks its
    model is on; its index lands at ``args[6]``).
    """

    script: tuple[int, ...] = (40, 41, 42, 43)
    ipc: FakeCudaIpc
    distributed = None
    receiver_device = torch.device("cuda", 3)

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForImageTextToText
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm_api import cpu_vllm_model, vllm_config_for

        self.kwargs = {"model": model, **kwargs}
        self.vllm_config = vllm_config_for(self.kwargs)  # EngineArgs validates the arguments as given
        self.input_processor = InputProcessor(self.vllm_config)
        hf = AutoModelForImageTextToText.from_pretrained(model)
        self.model = cpu_vllm_model(self.vllm_config, self.distributed,
                                    {n: p.detach().clone() for n, p in hf.named_parameters()})
        self.receiver = IPCWeightTransferEngine(self.vllm_config.weight_transfer_config, self.vllm_config,
                                                self.receiver_device, self.model)
        self.session_open = False
        self.events: list[str] = []
        self.requests: list = []
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.events.append("reset_encoder_cache"))

    # -- generation: vLLM's input processing, a scripted forward pass ----------------------------

    def generate(self, prompts, sampling_params, use_tqdm=True):
        from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs
        from vllm.outputs import CompletionOutput, RequestOutput

        assert len(prompts) == len(sampling_params)
        results = []
        for prompt, params in zip(prompts, sampling_params):
            request = self.input_processor.process_inputs(f"req-{len(self.requests)}", prompt, params,
                                                          supported_tasks=("generate",))
            self.requests.append(request)
            params = request.sampling_params
            tokens = (list(self.script) + list(params.stop_token_ids)[:1])[: params.max_tokens]
            logprobs = create_sample_logprobs(params.flat_logprobs)
            for k, token in enumerate(tokens):
                append_logprobs_for_next_position(logprobs, [token], [-0.25 * (k + 1)], [None], 1, params.logprobs)
            finish = "stop" if tokens and tokens[-1] in params.stop_token_ids else "length"
            completion = CompletionOutput(0, "", tokens, sum(-0.25 * (k + 1) for k in range(len(tokens))), logprobs,
                                          finish_reason=finish)
            results.append(RequestOutput(request.request_id, None, request.prompt_token_ids, None, [completion], True))
        self.events.append(f"generate({len(prompts)})")
        return results

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append("reset_prefix_cache")
        return True

    # -- weight transfer: vLLM's serializer and receiver, the worker's session bookkeeping --------

    def _collective_rpc(self, method: str, **kwargs):
        """What reaches a worker: the call through vLLM's msgpack encoder and decoder, as in ``collective_rpc``."""
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        decoded = MsgpackDecoder().decode(MsgpackEncoder().encode((method, kwargs)))
        return decoded[1]

    def init_weight_transfer_engine(self, request) -> None:
        kwargs = self._collective_rpc("init_weight_transfer_engine", init_info=request["init_info"])
        self.receiver.init_transfer_engine(self.receiver.parse_init_info(kwargs["init_info"]))
        self.events.append("init")

    def start_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config

        self._collective_rpc("start_weight_update")
        if self.session_open:
            raise RuntimeError("start_weight_update called while a weight update is already active. "
                               "Call finish_weight_update first.")
        with set_current_vllm_config(self.vllm_config):
            self.receiver.start_weight_update()
        self.session_open = True
        self.events.append("start")

    def update_weights(self, request) -> None:
        from vllm.config import set_current_vllm_config

        kwargs = self._collective_rpc("update_weights", update_info=request["update_info"])
        if not self.session_open:
            raise RuntimeError("start_weight_update must be called before update_weights.")
        try:
            with set_current_vllm_config(self.vllm_config):
                self.receiver.update_weights(kwargs["update_info"])
        except BaseException:
            self.session_open = False
            raise
        self.events.append(f"update({len(kwargs['update_info']['names'])})")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        from vllm.config import set_current_vllm_config

        self._collective_rpc("finish_weight_update")
        if not self.session_open:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update.")
        with set_current_vllm_config(self.vllm_config):
            self.receiver.finish_weight_update()
        self.session_open = False
        self.events.append("finish")
