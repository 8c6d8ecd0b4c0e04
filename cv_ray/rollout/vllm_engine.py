"""Generation with vLLM's asynchronous engine on GPU nodes (the ``vllm`` extra: vllm==0.33.0, checked
against its code).

* Launch: ``engine_kwargs`` builds the ``AsyncEngineArgs`` of ``vllm.v1.engine.async_llm.AsyncLLM``;
  :func:`cv_ray.placement.vllm_launch` adds the executor backend (``mp`` for tensor parallelism inside
  a Ray actor) and the environment vLLM must see before it starts (``VLLM_ALLOW_INSECURE_SERIALIZATION=1``
  for the IPC handles). The weight-transfer backend is ``nccl`` when the run's weights come over NCCL
  (``rollout.vllm.weight_sync``), else ``ipc``; vLLM fixes it at start-up.
* Continuous batching: every agent turn is one ``AsyncLLM.generate`` request, submitted the moment
  its trajectory asks for it. vLLM's scheduler adds it to the running batch at its next step, and the
  turn returns as soon as it is finished, whatever the other requests do: a trajectory back from the
  sandbox never waits for the slowest turn of a batch (the offline ``LLM.generate`` of the previous
  engine returned when its longest request did).
* Token-in/token-out with images: each request is ``TokensPrompt(prompt_token_ids=...,
  multi_modal_data={"image": [...]})``. vLLM runs the model's processor on the images itself and
  expands **one** ``<|image_pad|>`` per image into the right number of copies, so the expanded runs
  that our token accounting keeps (and the learner needs) are collapsed to one token per image first
  (feeding expanded ids would expand them twice; TRL #6294, prime-rl #1739). With the same pixel
  bounds (``processor_kwargs`` -> ``mm_processor_kwargs``) vLLM's expansion equals ours id for id
  (tests/rollout/test_vllm_api.py runs vLLM's input processor on both tiny models).
* Log-probs: ``logprobs_mode="processed_logprobs"`` and the sampled token's log-prob (``logprobs=0``).
  With the placeholder ids banned through ``bad_words`` and ``top_p == 1`` this is
  ``log_softmax(mask(logits) / temperature)``, i.e. ``cv_ray.logprobs.token_logprobs``.
* Weights, always inside vLLM's pause/resume: ``pause_generation(mode="keep", clear_cache=True)``
  freezes the requests in flight where they are and drops the prefix cache, the KV of the running
  requests (recomputed on resume) and the encoder caches (all computed with the old weights); then
  ``start_weight_update`` / ``update_weights`` / ``finish_weight_update(weight_version=v)`` load the
  new tensors through the model's own ``load_weights`` (HF names mapped, ``qkv_proj``/``gate_up_proj``
  packed) and label every later step with ``v``; ``resume_generation`` continues the frozen requests
  under the new weights. Three ways in: :meth:`VLLMEngine.update_weights` (full CPU tensors, the object
  store path: copied to every GPU of the engine and shared by CUDA IPC, per bucket, the copies alive
  until the update is finished since vLLM's layerwise reload may hold a layer's views until then),
  :meth:`VLLMEngine.receive_weights` (metadata of a NCCL broadcast from learner rank 0, or CUDA-IPC
  handles of rank 0's own parameters on a shared GPU; cv_ray/weight_sync.py drives both) and
  :meth:`VLLMEngine.init_weight_transfer` (the NCCL rendezvous). A failed update still closes vLLM's
  update session (else every later ``start_weight_update`` is refused) and resumes generation on the
  weights the engine then holds.
* Versions: vLLM labels every output token with the weight version of the step that sampled it
  (``CompletionOutput.weight_versions``); a turn in flight during an update straddles two versions.
  :func:`token_versions` reads the labels per token and ``GenerationOutput.weight_version`` is the
  *oldest* of a turn (the version its first token was sampled under: what staleness is measured from);
  ``describe()["straddled_turns"]`` counts the turns that straddled an update.

vLLM is imported inside the class only: the module imports on machines without vLLM. Tests:
tests/rollout/test_vllm_api.py (vLLM's own code on CPU: arguments, sampling parameters, prompts,
serializer, IPC receiver, model name mapping, backend choice), tests/rollout/test_vllm_engine.py (the
engine end to end through vLLM's real ``AsyncLLM`` on CPU, the engine core's forward pass stood in),
tests/rollout/test_vllm_weight_sync.py (the NCCL and IPC paths against vLLM's receivers) and
tests/rollout/test_vllm_gpu.py (real vLLM on a GPU).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from cv_ray.agent.generation import Engine, GenerationOutput, GenerationRequest, SamplingParams
from cv_ray.buckets import size_buckets
from cv_ray.models import ModelRef
from cv_ray.placement import vllm_launch
from cv_ray.rollout.config import RolloutConfig, VLLMConfig

#: vLLM's label for the weights an engine started with (``EngineCore._weight_version``), before any update.
INITIAL_VERSION_LABEL = "default"


def collapse_placeholders(ids: Sequence[int], placeholder_id: int) -> list[int]:
    """``ids`` with every run of ``placeholder_id`` shortened to one token (vLLM expands them itself)."""
    out: list[int] = []
    for token in ids:
        if token == placeholder_id and out and out[-1] == placeholder_id:
            continue
        out.append(token)
    return out


def engine_kwargs(model_path: str, cfg: VLLMConfig, max_images_per_prompt: int, seed: int = 0,
                  processor_kwargs: Mapping[str, int] | None = None,
                  weight_transfer_backend: str = "ipc") -> dict[str, Any]:
    """The ``AsyncEngineArgs(**kwargs)`` of one rollout engine (checked against vLLM's ``EngineArgs``).

    ``processor_kwargs``: the image bounds our own processor uses (``min_pixels`` / ``max_pixels``),
    passed to vLLM's image processor as ``mm_processor_kwargs`` (empty or ``None``: the checkpoint's
    ``preprocessor_config.json``); placeholder counts only agree when both sides resize alike.
    ``weight_transfer_backend``: ``ipc`` or ``nccl``, the receiver vLLM builds in every worker.
    """
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": cfg.max_model_len,
        "enable_sleep_mode": cfg.enable_sleep_mode,
        "enforce_eager": cfg.enforce_eager,
        "limit_mm_per_prompt": {"image": max_images_per_prompt, "video": 0},
        "logprobs_mode": "processed_logprobs",
        "weight_transfer_config": {"backend": weight_transfer_backend},
        "disable_log_stats": True,  # the rollout worker reports its own metrics
        "seed": seed,
        **vllm_launch(cfg.tensor_parallel_size).engine_kwargs,
    }
    if processor_kwargs:
        kwargs["mm_processor_kwargs"] = {key: int(value) for key, value in processor_kwargs.items()}
    return kwargs


def sampling_kwargs(sampling: SamplingParams, banned_words: Mapping[int, str]) -> dict[str, Any]:
    """``vllm.SamplingParams(**kwargs)`` for one request (the engine adds ``output_kind=FINAL_ONLY``).

    ``banned_words``: token id -> token string of the placeholders; vLLM takes bans as ``bad_words``
    strings and turns them back into ids with the tokenizer (checked against vLLM's input processor).
    ``ignore_eos``: a turn ends at the request's stop ids only, as in the HF engine; otherwise vLLM
    also stops at the tokenizer's EOS and adds every ``eos_token_id`` of the checkpoint's
    ``generation_config.json`` (Qwen's lists ``<|endoftext|>`` beside ``<|im_end|>``) to the stops, and
    a turn ended by one of those would read as cut by its length.
    """
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": True,
        "bad_words": [banned_words[i] for i in sampling.banned_token_ids if i in banned_words],
        "logprobs": 0,
        "seed": sampling.seed,  # per request: the same request samples the same tokens whatever the batch
        "detokenize": False,
        "skip_special_tokens": False,
    }


def vllm_prompt(request: GenerationRequest, image_token_id: int) -> dict[str, Any]:
    """The ``TokensPrompt`` of one request: one placeholder per image, the images as ``multi_modal_data``."""
    prompt: dict[str, Any] = {"prompt_token_ids": collapse_placeholders(request.prompt_ids, image_token_id)}
    if request.images:
        prompt["multi_modal_data"] = {"image": list(request.images)}
    return prompt


def version_of(label: str, initial: int) -> int:
    """Our weight version for one of vLLM's labels: ``default`` (never updated) is ``initial``; the
    engine labels every update with ``str(version)``."""
    if label == INITIAL_VERSION_LABEL:
        return initial
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"vLLM reported weight version {label!r}, which this engine never set (it labels "
                         f"updates with integers); was the engine updated by someone else?") from None


def token_versions(spans: Sequence[Any] | None, n_tokens: int, initial: int) -> list[int]:
    """Per output token, the weight version that sampled it, from vLLM's ``WeightVersionSpan``s
    (``version`` label, ``[start, end)`` over the output tokens; ``CompletionOutput.weight_versions``)."""
    if n_tokens == 0:
        return []
    if not spans:
        raise ValueError(f"vLLM reported no weight version for {n_tokens} output tokens")
    versions: list[int] = []
    for span in spans:
        if span.start != len(versions) or span.end <= span.start:
            raise ValueError(f"vLLM's weight-version spans do not tile the output: {spans!r}")
        versions += [version_of(span.version, initial)] * (span.end - span.start)
    if len(versions) != n_tokens:
        raise ValueError(f"vLLM's weight-version spans cover {len(versions)} of {n_tokens} output tokens")
    return versions


def weight_buckets(named_tensors: Mapping[str, torch.Tensor], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive ``(name, tensor)`` lists of at most ``max_bytes`` each (a larger tensor travels alone)."""
    return size_buckets(named_tensors.items(), max_bytes, lambda t: t.numel() * t.element_size())


def ipc_update_info(named_tensors: Sequence[tuple[str, torch.Tensor]],
                    targets: Sequence[tuple[str, torch.device]]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The ``update_info`` of vLLM's IPC backend for one bucket, and the device copies to keep alive.

    targets: ``(GPU UUID, device)`` of every GPU of the vLLM instance; each vLLM worker picks the
    handle of its own GPU. A handle is the argument tuple of ``reduce_tensor`` (not its
    ``(rebuild_fn, args)`` pair): the receiver calls ``rebuild_cuda_tensor(*args)`` itself. The
    copies must stay referenced until the update is *finished*: vLLM's layerwise reload keeps the
    received views of a layer until all of that layer's tensors arrived (possibly in a later bucket)
    and processes some layers only in ``finish_weight_update``, and a CUDA-IPC view does not keep
    the sender's memory alive.
    """
    names, dtype_names, shapes, handles, keep = [], [], [], [], []
    for name, tensor in named_tensors:
        per_gpu = {}
        for uuid, device in targets:
            copy = tensor.detach().to(device=device, memory_format=torch.contiguous_format, copy=True)
            keep.append(copy)
            _rebuild, args = reduce_tensor(copy)
            per_gpu[uuid] = args
        names.append(name)
        dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        handles.append(per_gpu)
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}, keep


class WeightUpdateError(RuntimeError):
    """A weight update that did not complete; the engine's update session was closed all the same."""


class VLLMEngine(Engine):
    def __init__(self, model_path: str, cfg: VLLMConfig, max_images_per_prompt: int, seed: int = 0,
                 processor_kwargs: Mapping[str, int] | None = None, weight_transfer_backend: str = "ipc"):
        # Before vLLM is imported or started: its processes read these at start-up.
        os.environ.update(vllm_launch(cfg.tensor_parallel_size).env)
        import vllm
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cv_ray.agent.chat import banned_token_ids

        self._vllm = vllm
        self.model_path = str(model_path)
        self.cfg = cfg
        self.weight_transfer_backend = weight_transfer_backend
        self.bucket_bytes = cfg.weight_bucket_mb * 2**20
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        self._banned_words = {i: tokenizer.convert_ids_to_tokens(i) for i in banned_token_ids(tokenizer)}
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
            self.model_path, cfg, max_images_per_prompt, seed, processor_kwargs, weight_transfer_backend)))
        self._request_ids = itertools.count()
        self._update_lock = asyncio.Lock()  # one weight update at a time; binds to the actor's loop on first use
        self._ipc_ready = False
        self.weight_version = 0
        self.failed_updates = 0
        self.straddled_turns = 0

    @classmethod
    def from_config(cls, model: ModelRef | str, cfg: RolloutConfig) -> VLLMEngine:
        # Every tool call can add an image: the task's images plus one per call, bounded by the turns.
        max_images = 4 + cfg.max_turns * 4
        model = ModelRef.of(model)
        # The receiver of the run's weight path (cv_ray.config.resolve_weight_sync); IPC serves the rest.
        backend = "nccl" if cfg.vllm.weight_sync == "nccl" else "ipc"
        # The run's image bounds (model.min_pixels / max_pixels), as every other processor uses them.
        return cls(model.path, cfg.vllm, max_images_per_prompt=max_images, processor_kwargs=model.processor_kwargs(),
                   weight_transfer_backend=backend)

    # -- generation: one vLLM request per turn ------------------------------------------------

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return list(await asyncio.gather(*(self._generate_one(request) for request in requests)))

    async def _generate_one(self, request: GenerationRequest) -> GenerationOutput:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = self._vllm.SamplingParams(**sampling_kwargs(request.sampling, self._banned_words),
                                           output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = TokensPrompt(**vllm_prompt(request, self.image_token_id))
        final = None
        async for output in self.llm.generate(prompt, params, request_id=f"turn-{next(self._request_ids)}"):
            final = output
        if final is None:
            raise RuntimeError("vLLM finished a request without any output")
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs, strict=True)]
        versions = token_versions(completion.weight_versions, len(ids), initial=0)
        if len(set(versions)) > 1:
            self.straddled_turns += 1
        stopped = bool(ids) and ids[-1] in request.sampling.stop_token_ids
        return GenerationOutput(ids, logprobs, "stop" if stopped else "length",
                                min(versions) if versions else self.weight_version)

    # -- weights ------------------------------------------------------------------------------

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Load full HF-named CPU tensors (the object-store path): per bucket, copied to every GPU of the
        engine and handed to vLLM's IPC receiver; the copies live until the update is finished."""
        if self.weight_transfer_backend != "ipc":
            raise WeightUpdateError(f"this engine receives weights over {self.weight_transfer_backend} "
                                    "(rollout.vllm.weight_sync); full tensors need the ipc receiver")
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        targets = self._weight_targets()
        shared: list[torch.Tensor] = []  # one copy of the sent weights per GPU at the peak

        async def send() -> None:
            for bucket in weight_buckets(named_tensors, self.bucket_bytes):
                info, copies = await asyncio.to_thread(ipc_update_info, bucket, targets)
                shared.extend(copies)
                await self.llm.update_weights(WeightTransferUpdateRequest(update_info=info))

        try:
            return await self._update(send, version, len(named_tensors))
        finally:
            shared.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def receive_weights(self, update_info: dict[str, Any], version: int | None = None) -> int:
        """Load what learner rank 0 sends: ``update_info`` is the NCCL backend's ``{names, dtype_names,
        shapes}`` (the tensors arrive through the broadcast that runs meanwhile) or the IPC backend's
        with handles of rank 0's own parameters on this GPU. Returns the new version."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async def send() -> None:
            await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

        return await self._update(send, version, len(update_info.get("names", ())))

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join learner rank 0's weight-transfer group (NCCL: the TCP rendezvous and the communicator;
        returns once every member has joined, so the learner's side must be opening meanwhile)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))
        self._ipc_ready = self.weight_transfer_backend == "ipc"

    def weight_endpoint(self) -> dict[str, Any]:
        """What a weight sender needs to know: the receiver backend, the GPUs (UUIDs, vLLM's worker i on
        the actor's ``cuda:i``) and their number (NCCL ranks)."""
        return {"backend": self.weight_transfer_backend, "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "gpu_uuids": [uuid for uuid, _ in self._weight_targets()]}

    async def _update(self, send: Callable[[], Awaitable[None]], version: int | None, total: int) -> int:
        """One weight update of ``total`` tensors inside vLLM's pause/resume; ``send`` delivers them."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        new_version = self.weight_version + 1 if version is None else version
        async with self._update_lock:
            # Requests in flight freeze where they are; the caches computed with the old weights go.
            await self.llm.pause_generation(mode="keep", clear_cache=True)
            try:
                if self.weight_transfer_backend == "ipc" and not self._ipc_ready:
                    # The IPC receiver's wire setting, stated rather than left to vLLM's default.
                    await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": False}))
                    self._ipc_ready = True
                await self.llm.start_weight_update()
                try:
                    await send()
                except Exception as error:
                    self.failed_updates += 1
                    raise await self._abandon_update(error, total) from error
                await self.llm.finish_weight_update(weight_version=str(new_version))
                self.weight_version = new_version
            finally:
                # The frozen requests continue, on the new weights (or, after a failure, on what the engine holds).
                await self.llm.resume_generation()
        return new_version

    async def _abandon_update(self, error: Exception, total: int) -> WeightUpdateError:
        """Close vLLM's update session after ``error`` and say what state the weights are in.

        vLLM's workers refuse a new ``start_weight_update`` while a session is open; an error raised
        before a chunk reached them (the serializer, a CUDA copy) leaves it open. Finishing loads
        nothing more: layers that received no tensor keep their old weights. The caches were dropped
        when generation paused and nothing ran since.
        """
        note = ""
        try:
            await self.llm.finish_weight_update()
        except Exception as close_error:  # noqa: BLE001 -- reported in the raised error; the workers closed it when they raised
            note = f"; finish_weight_update: {close_error}"
        return WeightUpdateError(
            f"vLLM weight update of {total} tensors failed ({type(error).__name__}: {error}){note}. The engine now "
            f"holds the old weights where no tensor arrived and serves them until the next successful update "
            f"(version stays {self.weight_version})")

    def _weight_targets(self) -> list[tuple[str, torch.device]]:
        """(UUID, device) of the GPUs this worker shares with vLLM's tensor-parallel workers.

        The actor sees exactly its bundle's GPUs (cv_ray.placement); vLLM's worker i uses cuda:i.
        """
        targets = []
        for index in range(self.cfg.tensor_parallel_size):
            device = torch.device("cuda", index)
            targets.append((str(torch.cuda.get_device_properties(device).uuid), device))
        return targets

    def describe(self) -> dict[str, object]:
        return {"engine": "vllm", "model_path": self.model_path, "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "weight_transfer_backend": self.weight_transfer_backend, "weight_version": self.weight_version,
                "failed_weight_updates": self.failed_updates, "straddled_turns": self.straddled_turns}

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process (and its workers)."""
        self.llm.shutdown()
