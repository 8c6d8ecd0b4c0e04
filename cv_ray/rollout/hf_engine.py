"""Generation with transformers (CPU or GPU): the engine of CPU runs, tests and small GPU jobs.

Concurrent requests are gathered into one left-padded ``generate`` call per batch
(:class:`~cv_ray.rollout.batching.RequestBatcher`). Sampling masks the image/video placeholder ids,
and the log-prob of every sampled token is ``cv_ray.logprobs.token_logprobs`` of the model's raw
logits at that step, under the request's temperature and bans: exactly what the learner recomputes
from a full forward pass (tests/rollout/test_hf_engine.py checks it to 1e-4).

Weights and versions: one lock serialises batches and weight loads, so a batch (one turn of every
trajectory in it) is generated under one set of weights, and the version read under that lock is
the one each of its outputs reports. A load waits for the running batch; trajectories in flight
continue under the new weights at their next turn.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from cv_ray.agent.chat import build_model_inputs
from cv_ray.agent.generation import Engine, GenerationOutput, GenerationRequest, SamplingParams
from cv_ray.logprobs import token_logprobs
from cv_ray.models import ModelRef
from cv_ray.rollout.batching import RequestBatcher
from cv_ray.rollout.config import RolloutConfig


class HFEngine(Engine):
    def __init__(self, model: ModelRef | str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 32):
        from transformers import AutoModelForImageTextToText, GenerationConfig

        model = ModelRef.of(model)
        self.model_path = model.path
        self.device = torch.device(device)
        self.processor = model.load_processor()
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # A neutral generation config: a checkpoint's defaults (top_k, repetition_penalty, ...) would
        # change the sampling distribution away from the one the log-probs describe.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=tokenizer.eos_token_id)
        self._model_lock = threading.Lock()
        self._batcher = RequestBatcher(self._run_batch, max_batch_size)
        self.weight_version = 0

    @classmethod
    def from_config(cls, model: ModelRef, cfg: RolloutConfig) -> HFEngine:
        on_gpu = cfg.gpus_per_worker > 0 and torch.cuda.is_available()
        return cls(model, device="cuda" if on_gpu else "cpu",
                   dtype=torch.bfloat16 if on_gpu else torch.float32, max_batch_size=cfg.hf_max_batch_size)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return await self._batcher.submit(requests)

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        import asyncio

        return await asyncio.to_thread(self._load_weights, named_tensors, version)

    def describe(self) -> dict[str, object]:
        return {"engine": "hf", "model_path": self.model_path, "device": str(self.device),
                "dtype": str(self.model.dtype), "weight_version": self.weight_version}

    # -- blocking parts (run in a worker thread) ----------------------------------------------

    def _load_weights(self, named_tensors: dict[str, torch.Tensor], version: int | None = None) -> int:
        known = self.model.state_dict()
        unknown = sorted(set(named_tensors) - set(known))
        if unknown:
            raise KeyError(f"{len(unknown)} weight names are not in {type(self.model).__name__}'s state dict, "
                           f"e.g. {unknown[:3]}")
        with self._model_lock, torch.no_grad():
            for name, tensor in named_tensors.items():
                if known[name].shape != tensor.shape:
                    raise ValueError(f"weight {name}: shape {tuple(tensor.shape)}, expected {tuple(known[name].shape)}")
                known[name].copy_(tensor.to(device=known[name].device, dtype=known[name].dtype))
            self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            s = request.sampling
            groups[(s.temperature, s.top_p, s.stop_token_ids, s.banned_token_ids)].append(i)
        with self._model_lock:
            version = self.weight_version  # the weights cannot change until the lock is released
            for indices in groups.values():
                for i, output in zip(indices, self._generate_group([requests[i] for i in indices])):
                    output.weight_version = version
                    outputs[i] = output
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_group(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """One padded ``generate`` for requests sharing temperature, top_p, stops and bans."""
        from transformers import GenerationConfig

        sampling: SamplingParams = requests[0].sampling
        max_new = max(r.sampling.max_new_tokens for r in requests)
        inputs = build_model_inputs(self.processor, [r.prompt_ids for r in requests], [r.images for r in requests],
                                    pad_id=self.pad_id, padding_side="left")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        greedy = sampling.temperature <= 0
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # None while sampling would mean transformers' default of 50
            eos_token_id=list(sampling.stop_token_ids) or None,
            pad_token_id=self.pad_id,
            suppress_tokens=list(sampling.banned_token_ids) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        result = self.model.generate(**inputs, generation_config=config)
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = result.sequences[:, prompt_len:]
        logits = torch.stack(result.logits, dim=1)  # [B, steps, vocab], raw (before any processor)
        logprobs, _ = token_logprobs(logits, new_tokens, sampling.temperature, sampling.banned_token_ids)
        stops = set(sampling.stop_token_ids)
        outputs = []
        for row, request in enumerate(requests):
            ids = new_tokens[row].tolist()[: request.sampling.max_new_tokens]
            end = next((k + 1 for k, t in enumerate(ids) if t in stops), None)
            finish = "stop" if end is not None else "length"
            ids = ids[:end] if end is not None else ids
            outputs.append(GenerationOutput(ids, logprobs[row, : len(ids)].tolist(), finish))
        return outputs
