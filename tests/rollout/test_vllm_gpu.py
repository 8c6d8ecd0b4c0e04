"""VLLMEngine on a real GPU with real vLLM (`gpu`: skipped without a GPU; tools/gpu_smoke.sh runs them).

A module of its own: the CPU tests' fixture (tests/rollout/vllm_api.py) puts vLLM's side-directory
copy on ``sys.path`` for the length of its module, and these tests need the vLLM installed in .venv.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
import torch
from rollout_testlib import noise_image

from cv_ray.agent.chat import ChatCodec
from cv_ray.rollout.config import VLLMConfig
from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.rollout.vllm_engine import VLLMEngine

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def _gpu_engine(path):
    """A real VLLMEngine on 30% of the GPU, its engine-core process shut down afterwards (the next test's
    engine and the learner's GPU test need the memory back)."""
    pytest.importorskip("vllm")
    engine = VLLMEngine(str(path), VLLMConfig(gpu_memory_utilization=0.3, max_model_len=4096), max_images_per_prompt=4)
    try:
        yield engine
    finally:
        engine.llm.llm_engine.engine_core.shutdown()


def test_vllm_engine_on_gpu(tiny_qwen25):
    """Real vLLM: log-probs under the placeholder ban, and a weight update through the IPC backend."""
    from transformers import AutoProcessor

    codec = ChatCodec(AutoProcessor.from_pretrained(tiny_qwen25))
    with _gpu_engine(tiny_qwen25) as engine:
        _check_logprobs_and_update(engine, codec, tiny_qwen25)


def _check_logprobs_and_update(engine, codec, tiny_qwen25):
    from transformers import AutoModelForImageTextToText

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


def test_vllm_prefix_cache_is_not_reused_across_a_weight_update(tiny_qwen25):
    """Real vLLM: a repeated prompt hits the prefix cache, and the first request after a weight update does not.

    Mutant: no prefix-cache reset after an update (issue 22, defect 4)."""
    from transformers import AutoModelForImageTextToText

    with _gpu_engine(tiny_qwen25) as engine:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(range(100, 164)))  # four full 16-token KV blocks
        params = VLLMSamplingParams(max_tokens=1)

        def cached_tokens() -> int:
            return engine.llm.generate([prompt], [params], use_tqdm=False)[0].num_cached_tokens or 0

        cached_tokens()
        assert cached_tokens() > 0
        model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25)
        asyncio.run(engine.update_weights({n: p.detach() for n, p in model.named_parameters()}))
        assert cached_tokens() == 0
