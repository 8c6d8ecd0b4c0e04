"""A tiny-model rollout with the HF engine and the real sandbox: masks, log-probs and images agree.

For every trajectory: ``len(response_ids) == len(response_mask) == len(rollout_logprobs)``; the
image placeholder tokens of prompt + response number exactly what ``image_grid_thw`` of its model
images implies; and the rollout log-probs equal ``token_logprobs`` of a fresh full-sequence forward
pass (1e-4), the learner's computation. A random tiny model never writes a tool call, so a second
test scripts two tool turns (run in the sandbox, images placed in the context) and lets the HF
engine sample the last turn on top of them.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from rollout_testlib import noise_image

from cv_ray.agent.chat import ChatCodec, build_model_inputs
from cv_ray.agent.config import LoopSettings
from cv_ray.agent.generation import Engine
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.logprobs import token_logprobs
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.types import Task

CFG = LoopSettings(max_turns=3, max_new_tokens_per_turn=16, max_response_tokens=2048, temperature=1.0,
                   tool_image_min_pixels=28 * 28, tool_image_max_pixels=28 * 28 * 6)


def tasks() -> list[Task]:
    return [Task(uid="t0", data_source="test", question="What is written?", images=[noise_image(64, 48, 0)], answer="7"),
            Task(uid="t1", data_source="test", question="Count the shapes.",
                 images=[noise_image(40, 90, 1), noise_image(56, 56, 2)], answer="3")]


def check_consistency(trajectory, engine, codec, temperature, scored_from: int = 0) -> None:
    """Lengths, placeholder counts and rollout log-probs vs a fresh forward pass (from response index ``scored_from``)."""
    n = len(trajectory.response_ids)
    assert n == len(trajectory.response_mask) == len(trajectory.rollout_logprobs) > 0
    full = trajectory.prompt_ids + trajectory.response_ids
    grid = engine.processor.image_processor(images=trajectory.model_images, return_tensors="pt")["image_grid_thw"]
    merge = engine.processor.image_processor.merge_size
    assert full.count(codec.image_token_id) == int((grid.prod(-1) // merge**2).sum())
    assert not set(codec.banned_ids) & {t for t, m in zip(trajectory.response_ids, trajectory.response_mask) if m}

    inputs = build_model_inputs(engine.processor, [full], [trajectory.model_images], pad_id=engine.pad_id)
    with torch.no_grad():
        logits = engine.model(**inputs).logits[0]
    p = len(trajectory.prompt_ids)
    fresh, _ = token_logprobs(logits[p - 1 : p - 1 + n], torch.tensor(trajectory.response_ids), temperature,
                              codec.banned_ids)
    mask = torch.tensor(trajectory.response_mask, dtype=torch.bool)
    mask[:scored_from] = False
    rollout = torch.tensor(trajectory.rollout_logprobs)
    assert mask.any()
    assert torch.allclose(fresh[mask], rollout[mask], atol=1e-4), (fresh[mask] - rollout[mask]).abs().max()
    assert (rollout[~torch.tensor(trajectory.response_mask, dtype=torch.bool)] == 0).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_hf_rollout_masks_logprobs_and_images_are_consistent(family, hf_engines, sandbox_tools):
    engine = hf_engines[family]
    codec = ChatCodec(engine.processor)
    torch.manual_seed(0)
    batches_before = len(engine.batch_sizes)
    trajectories = asyncio.run(AgentLoop(engine, codec, sandbox_tools, CFG).run_many(tasks(), n_samples=2))
    assert [(t.uid, t.sample_index) for t in trajectories] == [("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)]
    assert max(engine.batch_sizes[batches_before:]) > 1  # concurrent requests shared a generate call
    for t in trajectories:
        check_consistency(t, engine, codec, CFG.temperature)
        assert t.metrics["generation_s"] > 0


class ScriptThenModel(Engine):
    """Scripted turns first (tool calls that the sandbox runs), then the HF engine samples."""

    def __init__(self, scripted: ScriptedEngine, model: Engine, scripted_turns: int):
        self.scripted, self.model, self.scripted_turns = scripted, model, scripted_turns

    async def generate(self, requests):
        (request,) = requests
        if self.scripted._turn_index(request.prompt_ids) < self.scripted_turns:
            return await self.scripted.generate(requests)
        return await self.model.generate(requests)

    async def update_weights(self, named_tensors):
        raise NotImplementedError


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_model_turn_after_tool_images_matches_a_fresh_forward(family, hf_engines, sandbox_tools):
    engine = hf_engines[family]
    codec = ChatCodec(engine.processor)
    script = [format_tool_call("result = image.transpose(Image.ROTATE_270)", 0),
              format_tool_call("result = image.crop((4, 4, 40, 30))", 1)]
    hybrid = ScriptThenModel(ScriptedEngine(codec, script), engine, scripted_turns=2)
    torch.manual_seed(1)
    cfg = dataclasses.replace(CFG, max_new_tokens_per_turn=96)  # room for the scripted tool calls
    (trajectory,) = asyncio.run(AgentLoop(hybrid, codec, sandbox_tools, cfg).run_many(tasks()[:1], n_samples=1))
    assert [c.ok for c in trajectory.tool_calls] == [True, True]
    assert len(trajectory.model_images) == 3 and trajectory.num_turns == 3
    # Score only the model's turn: it starts after the last generation prompt.
    marker = codec.tokenizer.encode(codec.generation_prompt, add_special_tokens=False)
    ids = trajectory.response_ids
    last_prompt_end = max(i + len(marker) for i in range(len(ids)) if ids[i : i + len(marker)] == marker)
    check_consistency(trajectory, engine, codec, CFG.temperature, scored_from=last_prompt_end)


def test_temperature_override_zero_is_greedy(hf_engines, sandbox_tools):
    engine = hf_engines["qwen3_vl"]
    codec = ChatCodec(engine.processor)
    loop = AgentLoop(engine, codec, sandbox_tools, CFG)  # CFG samples at temperature 1
    a, b = asyncio.run(loop.run_many(tasks()[:1], n_samples=2, temperature=0.0))
    assert a.response_ids == b.response_ids
    check_consistency(a, engine, codec, temperature=0.0)  # scored at temperature 1 (cv_ray.logprobs)


def test_seeded_batches_sample_the_same_tokens(hf_engines, sandbox_tools):
    """The same batch with the same seed samples the same tokens; another seed samples others (what a
    resumed run needs to replay its steps). Mutant: the HF engine ignores the request seeds."""
    engine = hf_engines["qwen2_5_vl"]
    codec = ChatCodec(engine.processor)
    loop = AgentLoop(engine, codec, sandbox_tools, dataclasses.replace(CFG, max_turns=1))
    first, again, other = (asyncio.run(loop.run_many(tasks()[:2], n_samples=2, seed=seed)) for seed in (7, 7, 8))
    assert [t.response_ids for t in first] == [t.response_ids for t in again]
    assert [t.response_ids for t in first] != [t.response_ids for t in other]
    assert len({tuple(t.response_ids) for t in first}) > 1  # the samples of a batch still differ

