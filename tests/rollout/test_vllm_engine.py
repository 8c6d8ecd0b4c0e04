"""VLLMEngine end to end against vLLM's own CPU-side code (the GPU tests are in test_vllm_gpu.py).

The ``vllm_api`` tests run the engine with ``vllm.LLM`` replaced by tests/rollout/vllm_standin.CpuLLM:
vLLM's argument validation, input processor, serializer, IPC receiver and real model class, with
only the forward pass and CUDA IPC stood in (they need a GPU).
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest
import torch
import vllm_api as vllm_api_lib
import vllm_standin
from rollout_testlib import noise_image

from cv_ray.agent.chat import ChatCodec
from cv_ray.rollout import vllm_engine
from cv_ray.rollout.config import RolloutConfig
from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.rollout.vllm_engine import VLLMEngine, WeightUpdateError, collapse_placeholders, weight_buckets

# The methods VLLMEngine calls on vllm.LLM (and on its llm_engine): the stand-in must keep their signatures.
_LLM_METHODS = {"generate": (["p"], ["s"]), "init_weight_transfer_engine": ({"init_info": {}},),
                "start_weight_update": (), "update_weights": ({"update_info": {}},), "finish_weight_update": (),
                "reset_prefix_cache": ()}


def test_collapse_placeholders():
    assert collapse_placeholders([1, 9, 9, 9, 2, 9, 9, 3, 9], 9) == [1, 9, 2, 9, 3, 9]
    assert collapse_placeholders([], 9) == []


def test_weight_buckets_stay_under_the_bound_in_order():
    """Mutant: the bucket is flushed only after it passed the bound (buckets over ``max_bytes``)."""
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([10, 10, 5, 30, 1, 1])}  # float32: 4 bytes each
    buckets = list(weight_buckets(tensors, max_bytes=80))
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 for b in buckets if len(b) > 1)

# The fixtures of tests/rollout/vllm_api.py, by their names in this module.
vllm_api, distributed = vllm_api_lib.vllm_api, vllm_api_lib.distributed


@pytest.fixture
def cpu_engine(vllm_api, distributed, tiny_qwen25, monkeypatch):
    """A VLLMEngine over CpuLLM, CUDA IPC stood in by FakeCudaIpc (the engine's GPU copies stay on CPU)."""
    from vllm.distributed.weight_transfer import ipc_engine

    ipc = vllm_standin.FakeCudaIpc()
    monkeypatch.setattr(vllm_api, "LLM", vllm_standin.CpuLLM)
    monkeypatch.setattr(vllm_standin.CpuLLM, "distributed", distributed)
    monkeypatch.setattr(vllm_engine, "reduce_tensor", ipc.reduce_tensor)
    monkeypatch.setattr(ipc_engine, "rebuild_cuda_tensor", ipc.rebuild_cuda_tensor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=ipc.uuid))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(VLLMEngine, "_weight_targets", lambda self: [(ipc.uuid, torch.device("cpu"))])
    # The engine sets vLLM's environment in os.environ; monkeypatch restores what was there before.
    for key in vllm_engine.vllm_launch(1).env:
        monkeypatch.delenv(key, raising=False)
    engine = VLLMEngine.from_config(str(tiny_qwen25), RolloutConfig(engine="vllm", gpus_per_worker=1, max_turns=2))
    return engine, ipc


def _new_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return {name: torch.randn_like(p) for name, p in model.named_parameters()}


@pytest.mark.vllm_api
def test_generate_and_update_weights_through_vllm(cpu_engine, tiny_qwen25):
    """Requests pass vLLM's input processor (expanded back to our ids, bans to placeholder ids) and a
    weight update reaches vLLM's model through its serializer and IPC receiver, caches reset after.

    Mutant: images sent with expanded placeholders (vLLM's processor refuses the prompt), or the
    update payload carrying ``(rebuild_fn, args)`` pairs (the receiver fails on it)."""
    from transformers import AutoProcessor

    engine, ipc = cpu_engine
    llm = engine.llm
    codec = ChatCodec(AutoProcessor.from_pretrained(tiny_qwen25))
    images = [noise_image(64, 48), noise_image(30, 70, 1)]
    prompt = codec.encode_prompt("What?", images)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=(codec.end_of_turn_id,),
                              banned_token_ids=tuple(codec.banned_ids))
    requests = [GenerationRequest(prompt.ids, images, sampling),
                GenerationRequest(prompt.ids, images, SamplingParams(max_new_tokens=3, stop_token_ids=(7,)))]
    first, second = asyncio.run(engine.generate(requests))
    assert first.token_ids == [40, 41, 42, 43, codec.end_of_turn_id] and first.finish_reason == "stop"
    assert first.logprobs == [-0.25, -0.5, -0.75, -1.0, -1.25]
    assert second.token_ids == [40, 41, 42] and second.finish_reason == "length"
    processed = llm.requests[0]
    assert list(processed.prompt_token_ids) == prompt.ids  # vLLM expanded our one-per-image placeholders
    assert sorted(i for [i] in processed.sampling_params.bad_words_token_ids) == sorted(codec.banned_ids)

    weights = _new_weights(tiny_qwen25)
    assert asyncio.run(engine.update_weights(weights)) == 1
    params = dict(llm.model.named_parameters())
    assert torch.equal(params["language_model.model.layers.0.mlp.gate_up_proj.weight"],
                       torch.cat([weights[f"model.language_model.layers.0.mlp.{x}_proj.weight"] for x in ("gate", "up")]))
    assert set(ipc.rebuilt_on) == {llm.receiver_device.index}
    assert llm.events[-4:] == ["update(57)", "finish", "reset_prefix_cache", "reset_encoder_cache"]
    assert engine.describe()["weight_version"] == 1


@pytest.mark.vllm_api
def test_shared_copies_live_until_the_update_is_finished(cpu_engine, tiny_qwen25, monkeypatch):
    """With buckets that split layers, every tensor still lands intact: the engine keeps the memory its
    IPC handles point at until ``finish_weight_update`` (vLLM's layerwise reload holds a layer's views
    until the layer is complete; FakeCudaIpc poisons memory the sender dropped, as reuse would).

    Mutant: each bucket's copies released right after its ``update_weights`` call (NaNs in the
    layers that straddle two buckets)."""
    engine, _ = cpu_engine
    monkeypatch.setattr(vllm_engine, "WEIGHT_BUCKET_BYTES", 16 * 1024)
    weights = _new_weights(tiny_qwen25)
    assert len(list(weight_buckets(weights, 16 * 1024))) > 10
    assert asyncio.run(engine.update_weights(weights)) == 1
    params = dict(engine.llm.model.named_parameters())
    layer = "model.language_model.layers.1"
    assert torch.equal(params["language_model.model.layers.1.self_attn.qkv_proj.weight"],
                       torch.cat([weights[f"{layer}.self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert not any(torch.isnan(p).any() for p in params.values())


@pytest.mark.vllm_api
def test_caches_reset_after_every_update_before_generation(cpu_engine, tiny_qwen25):
    """After each update, before any later generation, the prefix cache and the encoder cache are reset
    (their KV and vision embeddings were computed with the old weights).

    Mutant: no reset after an update (issue 22, defect 4: the shared system prompt's KV from old
    weights keeps being reused)."""
    engine, _ = cpu_engine
    request = GenerationRequest([1, 2, 3], [], SamplingParams(max_new_tokens=2))
    for version in (1, 2):
        asyncio.run(engine.generate([request]))
        assert asyncio.run(engine.update_weights(_new_weights(tiny_qwen25))) == version
    asyncio.run(engine.generate([request]))
    events = [e for e in engine.llm.events if not e.startswith("update(")]
    assert events == ["init", "generate(1)", "start", "finish", "reset_prefix_cache", "reset_encoder_cache",
                      "generate(1)", "start", "finish", "reset_prefix_cache", "reset_encoder_cache", "generate(1)"]


@pytest.mark.vllm_api
@pytest.mark.parametrize("failure", ["serializer", "receiver"])
def test_failed_update_closes_vllm_session(cpu_engine, tiny_qwen25, monkeypatch, failure):
    """A failed update raises a WeightUpdateError and leaves vLLM ready for the next update, whether it
    failed before the workers saw it (vLLM's serializer, the session still open on their side) or in
    the receiver (which closes it itself).

    Mutant: the error propagates without ``finish_weight_update`` (issue 22, defect 2: the workers
    stay "update active" and refuse every later ``start_weight_update``)."""
    engine, _ = cpu_engine
    weights = _new_weights(tiny_qwen25)
    if failure == "serializer":
        monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION")  # what defect 2 ran into
        broken = weights
    else:
        broken = {**weights, "model.language_model.layers.0.mlp.no_such_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(WeightUpdateError, match="failed after 0 of"):
        asyncio.run(engine.update_weights(broken))
    assert not engine.llm.session_open
    assert engine.describe()["failed_weight_updates"] == 1 and engine.weight_version == 0
    assert engine.llm.events[-2:] == ["reset_prefix_cache", "reset_encoder_cache"]
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    assert asyncio.run(engine.update_weights(weights)) == 1


@pytest.mark.vllm_api
def test_standin_keeps_vllm_llm_signatures(vllm_api):
    """Every LLM method the engine calls exists on ``vllm.LLM`` and takes the same arguments as the stand-in's.

    Mutant: the stand-in grows a method or argument vLLM's LLM does not have (e.g. ``start_weight_update
    (is_checkpoint_format=True)``, which vLLM 0.33 dropped)."""
    from vllm.v1.engine.llm_engine import LLMEngine

    for name, args in _LLM_METHODS.items():
        inspect.signature(getattr(vllm_api.LLM, name)).bind(None, *args)
        inspect.signature(getattr(vllm_standin.CpuLLM, name)).bind(None, *args)
    assert callable(LLMEngine.reset_encoder_cache)
    assert {"generate", *_LLM_METHODS} <= {n for n in dir(vllm_standin.CpuLLM) if not n.startswith("_")}
