"""VLLMEngine on a real GPU with real vLLM (`gpu`: skipped without a GPU; tools/gpu_smoke.sh runs them).

A module of its own: the CPU tests' fixture (tests/rollout/vllm_api.py) puts vLLM's side-directory
copy on ``sys.path`` for the length of its module, and these tests need the vLLM installed in .venv.
Each test runs its asynchronous part in one ``asyncio.run`` (AsyncLLM's output handler lives on the
loop of its first request). The NCCL test needs two GPUs and skips on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import threading

import pytest
import torch
from rollout_testlib import noise_image

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.rollout.config import VLLMConfig
from cv_ray.rollout.vllm_engine import VLLMEngine

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def _gpu_engine(path, backend: str = "ipc", memory: float = 0.3):
    """A real VLLMEngine on ``memory`` of the GPU, its engine-core process shut down afterwards (the next
    test's engine and the learner's GPU test need the memory back)."""
    pytest.importorskip("vllm")
    engine = VLLMEngine(str(path), VLLMConfig(gpu_memory_utilization=memory, max_model_len=4096),
                        max_images_per_prompt=4, weight_transfer_backend=backend)
    try:
        yield engine
    finally:
        engine.shutdown()


def _codec(path) -> ChatCodec:
    from transformers import AutoProcessor

    return ChatCodec(AutoProcessor.from_pretrained(path))


def _uniform_logprob_request(codec: ChatCodec, max_new_tokens: int = 8):
    images = [noise_image(64, 48)]
    prompt = codec.encode_prompt("What?", images)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, stop_token_ids=(codec.end_of_turn_id,),
                              banned_token_ids=tuple(codec.banned_ids))
    return GenerationRequest(prompt.ids, images, sampling)


def _zero_head(path, device: str = "cpu", dtype=torch.float32):
    """The tiny model with its output head zeroed: every allowed token then has probability 1 / (vocab - banned)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def _expected_uniform(model, codec) -> float:
    return -math.log(model.config.text_config.vocab_size - len(codec.banned_ids))


def test_vllm_engine_on_gpu(tiny_qwen25):
    """Real vLLM: log-probs under the placeholder ban, and a weight update through the IPC backend."""
    codec = _codec(tiny_qwen25)
    model = _zero_head(tiny_qwen25)
    request = _uniform_logprob_request(codec)

    async def scenario(engine):
        (out,) = await engine.generate([request])
        assert out.token_ids and len(out.logprobs) == len(out.token_ids) and out.weight_version == 0
        assert not set(out.token_ids) & set(codec.banned_ids)
        assert await engine.update_weights({n: p.detach() for n, p in model.named_parameters()}) == 1
        (out,) = await engine.generate([request])
        return out

    with _gpu_engine(tiny_qwen25) as engine:
        out = asyncio.run(scenario(engine))
    assert out.weight_version == 1
    assert all(abs(lp - _expected_uniform(model, codec)) < 1e-3 for lp in out.logprobs)


def test_vllm_prefix_cache_is_not_reused_across_a_weight_update(tiny_qwen25):
    """Real vLLM: a repeated prompt hits the prefix cache, and the first request after a weight update does not.

    Mutant: the update pauses without clearing the caches (issue 22, defect 4)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25)

    async def scenario(engine):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(range(100, 164)))  # four full 16-token KV blocks
        params = VLLMSamplingParams(max_tokens=1)

        async def cached_tokens(request_id: str) -> int:
            final = None
            async for output in engine.llm.generate(prompt, params, request_id=request_id):
                final = output
            return final.num_cached_tokens or 0

        await cached_tokens("warm")
        hit = await cached_tokens("hit")
        await engine.update_weights({n: p.detach() for n, p in model.named_parameters()})
        return hit, await cached_tokens("after-update")

    with _gpu_engine(tiny_qwen25) as engine:
        hit, after = asyncio.run(scenario(engine))
    assert hit > 0 and after == 0


def test_a_turn_in_flight_straddles_an_update_and_finishes(tiny_qwen25):
    """Real vLLM's pause(keep)/resume: a long turn in flight when the weights change is frozen, continues
    on the new weights, finishes, and reports the version of its first token; a short turn submitted
    beside it returned long before (continuous batching).

    Mutant: the update pauses in ``abort`` mode (the long turn ends with no straddle, cut short)."""
    codec = _codec(tiny_qwen25)
    model = _zero_head(tiny_qwen25)
    long_turn = GenerationRequest([100 + i % 50 for i in range(64)], [],
                                  SamplingParams(temperature=1.0, max_new_tokens=1500, banned_token_ids=tuple(codec.banned_ids)))
    short_turn = GenerationRequest(list(range(200, 240)), [], SamplingParams(max_new_tokens=3))

    async def scenario(engine):
        running = asyncio.create_task(engine.generate([long_turn]))
        (short,) = await engine.generate([short_turn])  # returns after ~3 steps; the long turn needs 1500
        assert not running.done()
        await engine.update_weights({n: p.detach() for n, p in model.named_parameters()})
        (long,) = await running
        return short, long

    with _gpu_engine(tiny_qwen25) as engine:
        short, long = asyncio.run(scenario(engine))
        straddled = engine.describe()["straddled_turns"]
    assert len(short.token_ids) == 3
    assert len(long.token_ids) == 1500 and long.finish_reason == "length"
    assert long.weight_version == 0 and straddled == 1
    # The tail was sampled from the zeroed head: uniform log-probs.
    assert abs(long.logprobs[-1] - _expected_uniform(model, codec)) < 1e-3


def test_colocated_ipc_reads_this_process_parameters(tiny_qwen25):
    """The ``ipc`` path for real on one GPU: this process plays learner rank 0, exports CUDA-IPC handles of
    its own bf16 parameters, and the engine's vLLM worker (another process on the same GPU) loads them."""
    from cv_ray.learner.weight_sender import ipc_update_info

    codec = _codec(tiny_qwen25)
    learner = _zero_head(tiny_qwen25, device="cuda", dtype=torch.bfloat16)
    learner.get_submodule("model.visual").requires_grad_(False)
    uuid = str(torch.cuda.get_device_properties(0).uuid)

    async def scenario(engine):
        info, exported = ipc_update_info(learner, uuid)
        assert await engine.receive_weights(info, version=2) == 2
        del exported
        (out,) = await engine.generate([_uniform_logprob_request(codec)])
        return out

    with _gpu_engine(tiny_qwen25) as engine:
        out = asyncio.run(scenario(engine))
    assert out.weight_version == 2
    assert all(abs(lp - _expected_uniform(learner, codec)) < 1e-2 for lp in out.logprobs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL path needs two GPUs (learner and engine)")
def test_nccl_broadcast_on_two_gpus(tiny_qwen25):
    """The ``nccl`` path for real: this process is learner rank 0 on GPU 0; the engine's worker (GPU 1)
    joins the group and receives the broadcast of the trainable parameters in buckets."""
    from cv_ray.learner.weight_sender import NcclWeightSender, update_info, weight_metadata
    from cv_ray.learner.weights import iter_full_weights
    from cv_ray.weight_sync import nccl_layout

    torch.cuda.set_device(0)
    codec = _codec(tiny_qwen25)
    learner = _zero_head(tiny_qwen25, device="cuda:0", dtype=torch.bfloat16)
    learner.get_submodule("model.visual").requires_grad_(False)
    metadata = weight_metadata(learner, trainable_only=True)
    port, bucket = _free_port(), 1 << 20
    world, (info,) = nccl_layout([1], "127.0.0.1", port, bucket)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the engine's processes start on GPU 1; this one keeps GPU 0
    try:
        engine_cm = _gpu_engine(tiny_qwen25, backend="nccl")
        engine = engine_cm.__enter__()
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible

    async def scenario():
        opened: dict = {}
        opener = threading.Thread(target=lambda: opened.update(s=NcclWeightSender("127.0.0.1", port, world, bucket)))
        opener.start()
        await engine.init_weight_transfer(info)
        opener.join()
        tensors = iter_full_weights(learner, partitioned=False, keep=True, bucket_numel=1 << 40,
                                    trainable_only=True, device="cuda:0")
        sending = asyncio.get_running_loop().run_in_executor(None, opened["s"].send, tensors, metadata)
        version = await engine.receive_weights(update_info(metadata), version=1)
        await sending
        (out,) = await engine.generate([_uniform_logprob_request(codec)])
        return version, out

    try:
        version, out = asyncio.run(scenario())
    finally:
        engine_cm.__exit__(None, None, None)
    assert version == 1 == out.weight_version
    assert all(abs(lp - _expected_uniform(learner, codec)) < 1e-2 for lp in out.logprobs)
