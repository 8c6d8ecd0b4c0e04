"""Generation with vLLM on GPU nodes (the ``vllm`` extra; written against vLLM 0.32's documented API).

* Token-in/token-out with images: each request becomes ``TokensPrompt(prompt_token_ids=...,
  multi_modal_data={"image": [...]})``. vLLM runs the model's processor on the images itself and
  expands **one** ``<|image_pad|>`` per image into the right number of copies, so the expanded runs
  that our token accounting keeps (and the learner needs) are collapsed to one token per image
  before the call (feeding expanded ids would expand them twice; TRL #6294, prime-rl #1739).
* Log-probs: the engine is created with ``logprobs_mode="processed_logprobs"`` and requests the
  sampled token's log-prob (``logprobs=0``). With the placeholder ids banned through ``bad_words``
  and ``top_p == 1`` this is ``log_softmax(mask(logits) / temperature)``, i.e.
  ``cv_ray.logprobs.token_logprobs``; with ``top_p < 1`` vLLM reports the truncated distribution
  and the importance ratio is no longer 1 on-policy (use top_p = 1 for RL).
* Weights: vLLM's native weight-transfer API with the CUDA-IPC backend
  (``WeightTransferConfig(backend="ipc")``; ``start_weight_update`` / ``update_weights`` /
  ``finish_weight_update``). The rollout worker receives full HF-named CPU tensors, copies them
  bucket by bucket to the GPU(s) it shares with vLLM, and hands over IPC handles keyed by GPU UUID.
* Concurrency: the offline ``LLM`` is synchronous, so concurrent agent-loop requests are gathered
  by the same :class:`~cv_ray.rollout.batching.RequestBatcher` as the HF engine and run in a
  thread; vLLM batches each call internally.

vLLM is imported inside the class only: the module imports on machines without vLLM.
tests/rollout/test_vllm_engine.py holds a contract test against a stand-in and a GPU test.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Sequence
from typing import Any

import torch

from cv_ray.agent.generation import Engine, GenerationOutput, GenerationRequest
from cv_ray.models import ModelRef
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


def ipc_update_info(named_tensors: Sequence[tuple[str, torch.Tensor]],
                    targets: Sequence[tuple[str, torch.device]]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The ``update_info`` of vLLM's IPC backend for one bucket, and the device copies to keep alive.

    targets: ``(GPU UUID, device)`` of every GPU of the vLLM instance; each vLLM rank picks the
    handle of its own GPU. The copies must stay referenced until ``update_weights`` returns.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    names, dtype_names, shapes, handles, keep = [], [], [], [], []
    for name, tensor in named_tensors:
        per_gpu = {}
        for uuid, device in targets:
            copy = tensor.detach().to(device).contiguous()
            keep.append(copy)
            per_gpu[uuid] = reduce_tensor(copy)
        names.append(name)
        dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        handles.append(per_gpu)
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}, keep


class VLLMEngine(Engine):
    def __init__(self, model: ModelRef | str, cfg: VLLMConfig, max_images_per_prompt: int, seed: int = 0,
                 max_batch_size: int = 256):
        import vllm
        from transformers import AutoTokenizer
        from vllm.config import WeightTransferConfig

        from cv_ray.agent.chat import banned_token_ids

        model = ModelRef.of(model)
        self._vllm = vllm
        self.model_path = model.path
        self.cfg = cfg
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        self._banned_words = {i: tokenizer.convert_ids_to_tokens(i) for i in banned_token_ids(tokenizer)}
        self.llm = vllm.LLM(
            model=self.model_path,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            enable_sleep_mode=cfg.enable_sleep_mode,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            # The run's image bounds (model.min_pixels / max_pixels), as every other processor uses them.
            mm_processor_kwargs=model.processor_kwargs() or None,
            logprobs_mode="processed_logprobs",
            weight_transfer_config=WeightTransferConfig(backend="ipc"),
            seed=seed,
        )
        self._llm_lock = threading.Lock()
        self._batcher = RequestBatcher(self._run_batch, max_batch_size)
        self.weight_version = 0

    @classmethod
    def from_config(cls, model: ModelRef, cfg: RolloutConfig) -> VLLMEngine:
        # Every tool call can add an image: the task's images plus one per call, bounded by the turns.
        max_images = 4 + cfg.max_turns * 4
        return cls(model, cfg.vllm, max_images_per_prompt=max_images,
                   max_batch_size=max(cfg.max_concurrent_trajectories, 1))

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return await self._batcher.submit(requests)

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        return await asyncio.to_thread(self._load_weights, named_tensors, version)

    def describe(self) -> dict[str, object]:
        return {"engine": "vllm", "model_path": self.model_path, "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "weight_version": self.weight_version}

    # -- blocking parts (run in a worker thread) ----------------------------------------------

    def _sampling_params(self, request: GenerationRequest):
        s = request.sampling
        return self._vllm.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            stop_token_ids=list(s.stop_token_ids),
            bad_words=[self._banned_words[i] for i in s.banned_token_ids if i in self._banned_words],
            logprobs=0,
            detokenize=False,
            skip_special_tokens=False,
        )

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        prompts = []
        for request in requests:
            prompt = TokensPrompt(prompt_token_ids=collapse_placeholders(request.prompt_ids, self.image_token_id))
            if request.images:
                prompt["multi_modal_data"] = {"image": list(request.images)}
            prompts.append(prompt)
        with self._llm_lock:
            version = self.weight_version  # weights change only under this lock, between calls
            results = self.llm.generate(prompts, [self._sampling_params(r) for r in requests], use_tqdm=False)
        outputs = []
        for request, result in zip(requests, results, strict=True):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs, strict=True)]
            stopped = bool(ids) and ids[-1] in request.sampling.stop_token_ids
            outputs.append(GenerationOutput(ids, logprobs, "stop" if stopped else "length", version))
        return outputs

    def _weight_targets(self) -> list[tuple[str, torch.device]]:
        """(UUID, device) of the GPUs this worker shares with vLLM's tensor-parallel ranks."""
        targets = []
        for index in range(self.cfg.tensor_parallel_size):
            device = torch.device("cuda", index)
            targets.append((str(torch.cuda.get_device_properties(device).uuid), device))
        return targets

    def _load_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        targets = self._weight_targets()
        start = self.llm.start_weight_update
        # The names are the Hugging Face checkpoint's; vLLM maps them to its own layout.
        kwargs = {"is_checkpoint_format": True} if "is_checkpoint_format" in inspect.signature(start).parameters else {}
        with self._llm_lock:
            start(**kwargs)
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, tensor in named_tensors.items():
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= WEIGHT_BUCKET_BYTES:
                    self._send(bucket, targets)
                    bucket, size = [], 0
            if bucket:
                self._send(bucket, targets)
            self.llm.finish_weight_update()
            self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    def _send(self, bucket: list[tuple[str, torch.Tensor]], targets: list[tuple[str, torch.device]]) -> None:
        info, keep = ipc_update_info(bucket, targets)
        self.llm.update_weights({"update_info": info})
        del keep
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
