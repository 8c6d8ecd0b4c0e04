"""VLLMEngine: a contract test against a stand-in of vLLM's API, and a real run where vLLM and a GPU exist."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
import vllm_standin
from rollout_testlib import noise_image

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.rollout.config import RolloutConfig, VLLMConfig
from cv_ray.rollout.vllm_engine import VLLMEngine, collapse_placeholders


def test_collapse_placeholders():
    assert collapse_placeholders([1, 9, 9, 9, 2, 9, 9, 3, 9], 9) == [1, 9, 2, 9, 3, 9]
    assert collapse_placeholders([], 9) == []


def test_contract_generate_and_update_weights(monkeypatch, tiny_qwen25):
    from transformers import AutoProcessor

    vllm_standin.install(monkeypatch)
    processor = AutoProcessor.from_pretrained(tiny_qwen25)
    codec = ChatCodec(processor)
    vllm_standin.LLM.image_token_id = codec.image_token_id
    cfg = RolloutConfig(engine="vllm", gpus_per_worker=1, max_turns=2)
    engine = VLLMEngine.from_config(str(tiny_qwen25), cfg)
    kwargs = engine.llm.kwargs
    assert kwargs["weight_transfer_config"].backend == "ipc"
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    assert kwargs["tensor_parallel_size"] == cfg.vllm.tensor_parallel_size

    images = [noise_image(64, 48), noise_image(30, 70, 1)]
    prompt = codec.encode_prompt("What?", images)
    assert prompt.ids.count(codec.image_token_id) > len(images)  # expanded on our side
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=(codec.end_of_turn_id,),
                              banned_token_ids=tuple(codec.banned_ids))
    requests = [GenerationRequest(prompt.ids, images, sampling),
                GenerationRequest(prompt.ids, images, SamplingParams(max_new_tokens=3, stop_token_ids=(7,)))]
    first, second = asyncio.run(engine.generate(requests))
    assert first.token_ids == [40, 41, 42, 43, codec.end_of_turn_id] and first.finish_reason == "stop"
    assert first.logprobs == [-0.25, -0.5, -0.75, -1.0, -1.25]
    assert second.token_ids == [40, 41, 42] and second.finish_reason == "length"
    sent = engine.llm.prompts[0]
    assert sent["prompt_token_ids"] == collapse_placeholders(prompt.ids, codec.image_token_id)
    assert sent["multi_modal_data"]["image"] == images

    # Weight updates: start -> update(s) -> finish, handles keyed by GPU UUID, tensors rebuilt intact.
    monkeypatch.setattr(VLLMEngine, "_weight_targets", lambda self: [("GPU-standin", torch.device("cpu"))])
    weights = {"lm_head.weight": torch.randn(8, 4), "model.language_model.norm.weight": torch.ones(4)}
    assert asyncio.run(engine.update_weights(weights)) == 1
    assert engine.llm.events == ["start(checkpoint=True)", "update(2)", "finish"]
    for name, tensor in weights.items():
        assert torch.equal(engine.llm.weights[name], tensor)
    assert engine.describe()["weight_version"] == 1


@pytest.mark.gpu
def test_vllm_engine_on_gpu(tiny_qwen25):
    """Real vLLM: log-probs under the placeholder ban, and a weight update through the IPC backend."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    codec = ChatCodec(AutoProcessor.from_pretrained(tiny_qwen25))
    engine = VLLMEngine(str(tiny_qwen25), VLLMConfig(gpu_memory_utilization=0.3, max_model_len=4096),
                        max_images_per_prompt=4)
    images = [noise_image(64, 48)]
    prompt = codec.encode_prompt("What?", images)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=(codec.end_of_turn_id,),
                              banned_token_ids=tuple(codec.banned_ids))
    (out,) = asyncio.run(engine.generate([GenerationRequest(prompt.ids, images, sampling)]))
    assert out.token_ids and len(out.logprobs) == len(out.token_ids)
    assert not set(out.token_ids) & set(codec.banned_ids)
    # Zero the output head: every allowed token then has probability 1 / (vocab - banned).
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    weights["lm_head.weight"] = torch.zeros_like(weights["lm_head.weight"])
    assert asyncio.run(engine.update_weights(weights)) == 1
    (out,) = asyncio.run(engine.generate([GenerationRequest(prompt.ids, images, sampling)]))
    expected = -math.log(model.config.text_config.vocab_size - len(codec.banned_ids))
    assert all(abs(lp - expected) < 1e-3 for lp in out.logprobs)
