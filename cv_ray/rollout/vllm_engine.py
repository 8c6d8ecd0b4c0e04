"""Generation with vLLM on GPU nodes (the ``vllm`` extra: vllm==0.33.0, checked against its code).

* Launch: ``engine_kwargs`` builds the ``vllm.LLM`` arguments and :func:`cv_ray.placement.vllm_launch`
  adds the executor backend (``mp`` for tensor parallelism inside a Ray actor) and the environment
  vLLM must see before it starts (``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for the IPC handles).
* Token-in/token-out with images: each request becomes ``TokensPrompt(prompt_token_ids=...,
  multi_modal_data={"image": [...]})``. vLLM runs the model's processor on the images itself and
  expands **one** ``<|image_pad|>`` per image into the right number of copies, so the expanded runs
  that our token accounting keeps (and the learner needs) are collapsed to one token per image
  before the call (feeding expanded ids would expand them twice; TRL #6294, prime-rl #1739). With
  the same pixel bounds (``processor_kwargs`` -> ``mm_processor_kwargs``) vLLM's expansion equals ours
  id for id (tests/rollout/test_vllm_api.py runs vLLM's input processor on both tiny models).
* Log-probs: the engine is created with ``logprobs_mode="processed_logprobs"`` and requests the
  sampled token's log-prob (``logprobs=0``). With the placeholder ids banned through ``bad_words``
  and ``top_p == 1`` this is ``log_softmax(mask(logits) / temperature)``, i.e.
  ``cv_ray.logprobs.token_logprobs``; with ``top_p < 1`` vLLM reports the truncated distribution
  and the importance ratio is no longer 1 on-policy (use top_p = 1 for RL).
* Weights: vLLM's native weight transfer with the CUDA-IPC backend
  (``weight_transfer_config={"backend": "ipc"}``): ``start_weight_update()``, then per bucket of at
  most ``WEIGHT_BUCKET_BYTES`` the full HF-named tensors are copied to every GPU of the engine (the
  copies live until the update is finished: vLLM may hold their views until then) and sent as ``update_weights({"update_info": {names, dtype_names, shapes, ipc_handles}})``, each
  handle a ``{gpu_uuid: args}`` map where ``args`` are the *arguments* of
  ``torch.multiprocessing.reductions.reduce_tensor`` (vLLM's receiver,
  ``vllm/distributed/weight_transfer/ipc_engine.py``, puts its own device index at ``args[6]`` and
  calls ``rebuild_cuda_tensor(*args)``), then ``finish_weight_update()``. vLLM loads them through
  the model's own ``load_weights`` (HF names mapped, ``qkv_proj``/``gate_up_proj`` packed). After
  every update, failed or not, the prefix cache and the encoder cache are reset: their entries hold
  KV and vision embeddings computed with the old weights (the shared system prompt and tool schema
  would otherwise keep being served from them: silent off-policy drift). A failed update still
  closes vLLM's update session (else every later ``start_weight_update`` is refused).
* Concurrency: the offline ``LLM`` is synchronous, so concurrent agent-loop requests are gathered
  by the same :class:`~cv_ray.rollout.batching.RequestBatcher` as the HF engine and run in a
  thread; vLLM batches each call internally.

vLLM is imported inside the class only: the module imports on machines without vLLM. Tests:
tests/rollout/test_vllm_api.py (vLLM's own code on CPU: arguments, sampling parameters, prompts,
serializer, IPC receiver, model name mapping, backend choice), tests/rollout/test_vllm_engine.py
(the engine end to end against vLLM's CPU-side code with the forward pass stood in) and
tests/rollout/test_vllm_gpu.py (real vLLM on a GPU).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from cv_ray.agent.generation import Engine, GenerationOutput, GenerationRequest, SamplingParams
from cv_ray.buckets import size_buckets
from cv_ray.models import ModelRef
from cv_ray.placement import vllm_launch
from cv_ray.rollout.batching import RequestBatcher
from cv_ray.rollout.config import RolloutConfig, VLLMConfig

# Weights travel in buckets of at most this many bytes per GPU (bounded extra GPU memory).
WEIGHT_BUCKET_BYTES = 512 * 1024 * 1024


def collapse_placeholders(ids: Sequence[int], placeholder_id: int) -> list[int]:
    """``ids`` with every run of ``placeholder_id`` shortened to one token (vLLM expands them itself)."""
    out: list[int] = []
    for token in ids:
        if token == placeholder_id and out and out[-1] == placeholder_id:
            continue
        out.append(token)
    return out


def engine_kwargs(model_path: str, cfg: VLLMConfig, max_images_per_prompt: int, seed: int = 0,
                  processor_kwargs: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ``vllm.LLM(**kwargs)`` arguments of one rollout engine (checked against vLLM's ``EngineArgs``).

    ``processor_kwargs``: the image bounds our own processor uses (``min_pixels`` / ``max_pixels``),
    passed to vLLM's image processor as ``mm_processor_kwargs`` (empty or ``None``: the checkpoint's
    ``preprocessor_config.json``); placeholder counts only agree when both sides resize alike.
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
        "weight_transfer_config": {"backend": "ipc"},
        "seed": seed,
        **vllm_launch(cfg.tensor_parallel_size).engine_kwargs,
    }
    if processor_kwargs:
        kwargs["mm_processor_kwargs"] = {key: int(value) for key, value in processor_kwargs.items()}
    return kwargs


def sampling_kwargs(sampling: SamplingParams, banned_words: Mapping[int, str]) -> dict[str, Any]:
    """``vllm.SamplingParams(**kwargs)`` for one request.

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
                 max_batch_size: int = 256, processor_kwargs: Mapping[str, int] | None = None):
        # Before vLLM is imported or started: its processes read these at start-up.
        os.environ.update(vllm_launch(cfg.tensor_parallel_size).env)
        import vllm
        from transformers import AutoTokenizer

        from cv_ray.agent.chat import banned_token_ids

        self._vllm = vllm
        self.model_path = str(model_path)
        self.cfg = cfg
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        self._banned_words = {i: tokenizer.convert_ids_to_tokens(i) for i in banned_token_ids(tokenizer)}
        self.llm = vllm.LLM(**engine_kwargs(self.model_path, cfg, max_images_per_prompt, seed, processor_kwargs))
        # The IPC receiver's wire setting, stated rather than left to vLLM's default: one handle per tensor.
        self.llm.init_weight_transfer_engine({"init_info": {"packed": False}})
        self._llm_lock = threading.Lock()
        self._batcher = RequestBatcher(self._run_batch, max_batch_size)
        self.weight_version = 0
        self.failed_updates = 0

    @classmethod
    def from_config(cls, model: ModelRef | str, cfg: RolloutConfig) -> VLLMEngine:
        # Every tool call can add an image: the task's images plus one per call, bounded by the turns.
        max_images = 4 + cfg.max_turns * 4
        model = ModelRef.of(model)
        # The run's image bounds (model.min_pixels / max_pixels), as every other processor uses them.
        return cls(model.path, cfg.vllm, max_images_per_prompt=max_images,
                   max_batch_size=max(cfg.max_concurrent_trajectories, 1), processor_kwargs=model.processor_kwargs())

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return await self._batcher.submit(requests)

    async def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        return await asyncio.to_thread(self._load_weights, named_tensors)

    def describe(self) -> dict[str, object]:
        return {"engine": "vllm", "model_path": self.model_path, "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "weight_version": self.weight_version, "failed_weight_updates": self.failed_updates}

    # -- blocking parts (run in a worker thread) ----------------------------------------------

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(**vllm_prompt(r, self.image_token_id)) for r in requests]
        params = [self._vllm.SamplingParams(**sampling_kwargs(r.sampling, self._banned_words)) for r in requests]
        with self._llm_lock:
            results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for request, result in zip(requests, results, strict=True):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs, strict=True)]
            stopped = bool(ids) and ids[-1] in request.sampling.stop_token_ids
            outputs.append(GenerationOutput(ids, logprobs, "stop" if stopped else "length"))
        return outputs

    def _weight_targets(self) -> list[tuple[str, torch.device]]:
        """(UUID, device) of the GPUs this worker shares with vLLM's tensor-parallel workers.

        The actor sees exactly its bundle's GPUs (cv_ray.placement); vLLM's worker i uses cuda:i.
        """
        targets = []
        for index in range(self.cfg.tensor_parallel_size):
            device = torch.device("cuda", index)
            targets.append((str(torch.cuda.get_device_properties(device).uuid), device))
        return targets

    def _load_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        targets = self._weight_targets()
        sent = 0
        # The device copies every handle points at, alive until vLLM has finished the update (see
        # ipc_update_info): one copy of the sent weights per GPU of the engine at the peak.
        shared: list[torch.Tensor] = []
        try:
            with self._llm_lock:
                self.llm.start_weight_update()
                try:
                    for bucket in weight_buckets(named_tensors, WEIGHT_BUCKET_BYTES):
                        info, copies = ipc_update_info(bucket, targets)
                        shared.extend(copies)
                        self.llm.update_weights({"update_info": info})
                        sent += len(bucket)
                except Exception as error:
                    self.failed_updates += 1
                    raise self._abandon_update(error, sent, len(named_tensors)) from error
                self.llm.finish_weight_update()
                self._reset_caches()
                self.weight_version += 1
        finally:
            shared.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self.weight_version

    def _abandon_update(self, error: Exception, sent: int, total: int) -> WeightUpdateError:
        """Close vLLM's update session after ``error`` and say what state the weights are in.

        vLLM's workers refuse a new ``start_weight_update`` while a session is open; an error raised
        before a chunk reached them (the serializer, a CUDA copy) leaves it open. Finishing loads
        nothing more: layers that received no tensor keep their old weights.
        """
        note = ""
        try:
            self.llm.finish_weight_update()
        except Exception as close_error:  # noqa: BLE001 -- reported in the raised error; the workers closed it when they raised
            note = f"; closing the update session: {close_error}"
        self._reset_caches()
        return WeightUpdateError(
            f"vLLM weight update failed after {sent} of {total} tensors: {error}{note}. The engine now holds "
            f"the old weights where no tensor arrived and serves them until the next successful update; the "
            f"caches were reset.")

    def _reset_caches(self) -> None:
        """Drop prefix-cache KV and cached vision embeddings computed with the previous weights."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update (requests still "
                               "running); generation and updates must not overlap (the engine lock serialises them)")
        self.llm.llm_engine.reset_encoder_cache()
