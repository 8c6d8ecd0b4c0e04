"""Per-token weight versions: the real agent loop across a weight update between two turns, and the HF
engine reporting the version of the weights that generated each output."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cv_ray.agent.generation import GenerationRequest, SamplingParams
from cv_ray.agent.loop import AgentLoop, LoopSettings
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.agent.tool_runner import LocalToolRunner
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.types import Task

TURNS = [format_tool_call("result = image.transpose(Image.ROTATE_90)", 0, "turn it"),
         "<think>upright now</think><answer>7</answer>"]


def noise_task(uid: str) -> Task:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return Task(uid=uid, data_source="test", question="What number?", images=[image], answer="7")


class UpdateDuringFirstCall:
    """The real sandbox, except that the first tool call loads new weights (version 1) into the engine
    before it runs: the learner's push landing while the episodes wait for their tools."""

    def __init__(self, sandbox: LocalToolRunner, engine: ScriptedEngine):
        self.sandbox, self.engine, self.updated = sandbox, engine, False

    async def run(self, code, images, image_index=0, session_id=None):
        if not self.updated:
            self.updated = True
            assert await self.engine.update_weights({}, version=1) == 1
        return await self.sandbox.run(code, images, image_index, session_id)

    def close_session(self, session_id: str) -> None:
        self.sandbox.close_session(session_id)


def test_each_turn_records_the_version_that_sampled_it_across_an_update(tiny_qwen25):
    """Two episodes, both first turns sampled under version 0, the push lands during the first tool call,
    both second turns under version 1; tool responses and separators carry -1. Mutants: the loop tags a
    whole trajectory with the version of its last turn; the engine reports the version at the end of a
    turn instead of its start; tool tokens tagged with the turn's version."""
    from transformers import AutoProcessor

    from cv_ray.agent.chat import ChatCodec
    from cv_ray.sandbox import SandboxPool
    from cv_ray.sandbox.config import SandboxConfig

    codec = ChatCodec(AutoProcessor.from_pretrained(tiny_qwen25))
    engine = ScriptedEngine(codec, TURNS, seconds_per_token=1e-4)
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=10.0)) as pool:
        tools = UpdateDuringFirstCall(LocalToolRunner(pool), engine)
        loop = AgentLoop(engine, codec, tools, LoopSettings(max_turns=3))
        trajectories = asyncio.run(loop.run_many([noise_task("a"), noise_task("b")], n_samples=1))
    for t in trajectories:
        assert t.stop_reason == "answer" and len(t.tool_calls) == 1 and t.tool_calls[0].ok
        assert len(t.token_versions) == len(t.response_ids) == len(t.response_mask)
        first = len(engine.turn_ids[0]) + 1  # the turn's ids and its end-of-turn token
        second = len(engine.turn_ids[1]) + 1
        tail = len(codec.separator_ids)  # after the last turn
        inserted = len(t.response_ids) - first - second - tail
        assert t.response_mask == [1] * first + [0] * inserted + [1] * second + [0] * tail
        assert t.token_versions == [0] * first + [-1] * inserted + [1] * second + [-1] * tail
        assert t.oldest_version() == 0


def test_hf_engine_outputs_report_the_version_their_weights_were_loaded_as(tiny_qwen25):
    """The driver names the version (a resumed run, a restarted worker): outputs generated after the load
    report it and come from the loaded weights (a zeroed output head makes every allowed token
    -log(vocab - 4 placeholders)). Without a version, loads count on from the last one.
    Mutant: update_weights ignoring the version it is given."""
    from cv_ray.agent.chat import ChatCodec
    from cv_ray.rollout.hf_engine import HFEngine

    engine = HFEngine(str(tiny_qwen25))
    codec = ChatCodec(engine.processor)
    task = noise_task("c")
    request = GenerationRequest(codec.encode_prompt(task.question, task.images).ids, task.images,
                                SamplingParams(temperature=1.0, max_new_tokens=4, banned_token_ids=tuple(codec.banned_ids)))

    async def generate():
        (out,) = await engine.generate([request])
        return out

    assert asyncio.run(generate()).weight_version == 0
    head = engine.model.lm_head.weight
    assert asyncio.run(engine.update_weights({"lm_head.weight": torch.zeros_like(head)}, version=7)) == 7
    out = asyncio.run(generate())
    vocab = engine.model.config.text_config.vocab_size
    assert out.weight_version == 7
    assert out.logprobs == pytest.approx([-math.log(vocab - 4)] * len(out.token_ids), abs=1e-5)
    assert asyncio.run(engine.update_weights({"lm_head.weight": head.detach().clone()})) == 8
    assert asyncio.run(generate()).weight_version == 8
