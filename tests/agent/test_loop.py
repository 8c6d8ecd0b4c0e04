"""Agent loop behaviour: stop reasons, budget truncation, image lineage, concurrency, metrics.

Tool calls run in the real sandbox, except in the concurrency test, whose in-process runner sleeps
for controlled times (sandboxed code cannot sleep).
"""

from __future__ import annotations

import asyncio

from agent_testlib import CROP, FAILING, ROTATE_90, noise_image

from cv_ray.agent.config import LoopSettings
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.geometry import map_box
from cv_ray.rollout.scripted_engine import ScriptedEngine
from cv_ray.types import ExecResult, Task

ANSWER = "<think>done</think><answer>7</answer>"


def make_task(uid: str = "t0") -> Task:
    return Task(uid=uid, data_source="test", question="What number?", images=[noise_image(64, 48)], answer="7")


def run(codec, turns, tools, cfg=None, task=None):
    cfg = cfg or LoopSettings(max_turns=6)
    return asyncio.run(AgentLoop(ScriptedEngine(codec, turns), codec, tools, cfg).run(task or make_task()))


def test_lineage_maps_a_crop_of_a_rotated_output_back_to_image_0(codecs, sandbox_tools):
    t = run(codecs["qwen2_5_vl"], [format_tool_call(ROTATE_90, 0, "turn it"), format_tool_call(CROP, 1), ANSWER],
            sandbox_tools)
    assert [c.description for c in t.tool_calls] == ["turn it", ""]
    assert [im.size for im in t.images] == [(64, 48), (48, 64), (32, 24)]
    assert t.image_parent == [None, 0, 1]
    assert [c.output_index for c in t.tool_calls] == [1, 2]
    # Image 1 is image 0 turned 90 degrees counter-clockwise: (x', y') comes from (64 - y', x').
    # The crop [8, 4, 40, 28] of image 1 covers x in [64 - 28, 64 - 4] = [36, 60], y in [8, 40] of image 0.
    assert map_box(t.image_to_origin[2], [0, 0, 32, 24]) == [36.0, 8.0, 60.0, 40.0]
    assert t.tool_calls[0].result.image is None  # images live in Trajectory.images only


def test_stop_reasons(codecs, sandbox_tools):
    codec = codecs["qwen3_vl"]
    assert run(codec, ["<think>no idea</think>"], sandbox_tools).stop_reason == "no_tool_call"
    assert run(codec, [ANSWER], sandbox_tools).stop_reason == "answer"
    # A call in the last allowed turn is not executed.
    t = run(codec, [format_tool_call(ROTATE_90, 0)] * 3, sandbox_tools, cfg=LoopSettings(max_turns=2))
    assert (t.stop_reason, t.num_turns, len(t.tool_calls)) == ("max_turns", 2, 1)
    # A turn cut by its token limit ends the episode with no separator after it.
    t = run(codec, [ANSWER], sandbox_tools, cfg=LoopSettings(max_new_tokens_per_turn=4))
    assert (t.stop_reason, len(t.response_ids), t.response_mask) == ("max_tokens", 4, [1, 1, 1, 1])


def test_tool_response_over_budget_drops_its_images_and_placeholders(codecs, sandbox_tools):
    codec = codecs["qwen2_5_vl"]
    first = format_tool_call(ROTATE_90, 0)
    sampled = len(codec.tokenizer.encode(first)) + 1 + len(codec.separator_ids)
    cfg = LoopSettings(max_response_tokens=sampled + 12)
    t = run(codec, [first, ANSWER], sandbox_tools, cfg=cfg)
    assert t.stop_reason == "max_tokens"
    assert len(t.response_ids) == len(t.response_mask) == len(t.rollout_logprobs) == cfg.max_response_tokens
    assert t.model_images == t.images[:1]  # the tool output was not placed
    assert codec.image_token_id not in t.response_ids
    assert t.response_mask[sampled:] == [0] * 12
    assert t.metrics["truncated_tool_response"] == 1.0
    assert len(t.images) == 2 and t.tool_calls[0].output_index == 1  # kept at full resolution


def test_error_metrics(codecs, sandbox_tools):
    bad = "<tool_call>\n{oops\n</tool_call>"
    t = run(codecs["qwen3_vl"], [bad, format_tool_call(FAILING, 0) + format_tool_call(CROP, 9), ANSWER], sandbox_tools)
    assert [c.parse_error_class for c in t.tool_calls] == ["malformed_json", None, None]
    # each record keeps the text between the tags as written (the reference-compatible reward re-reads it)
    assert t.tool_calls[0].payload == "\n{oops\n"
    assert t.tool_calls[2].payload == format_tool_call(CROP, 9)[len("<tool_call>"):-len("</tool_call>")]
    assert [c.result.error_class for c in t.tool_calls[1:]] == ["runtime", "image_index"]
    assert t.metrics["tool_calls"] == 3 and t.metrics["tool_errors"] == 3
    assert t.metrics["tool_errors/malformed_json"] == 1 and t.metrics["tool_errors/runtime"] == 1
    assert t.metrics["tool_errors/image_index"] == 1
    assert t.model_images == t.images == t.images[:1]


class GatedTools:
    """Tools whose first call returns only once some trajectory generates while that call is pending.

    If the loop ran trajectories one after another (or blocked its event loop during a tool call), no
    generation could happen while the call waits and the gate would never open: the test then fails
    at the (generous) deadline instead of passing on a timing coincidence.
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.pending_first = False
        self.calls = 0
        self.closed: list[str] = []

    async def run(self, code, images, image_index=0, session_id=None) -> ExecResult:
        self.calls += 1
        if self.calls == 1:
            self.pending_first = True
            await asyncio.wait_for(self.gate.wait(), timeout=60)
            self.pending_first = False
        return ExecResult(ok=True, image=images[image_index].copy(), to_input=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])

    def close_session(self, session_id: str) -> None:
        self.closed.append(session_id)


class GateOpeningEngine(ScriptedEngine):
    """Opens the tools' gate when asked to generate while the first tool call is pending."""

    def __init__(self, tools: GatedTools, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = tools
        self.generated_during_call = 0

    async def generate(self, requests):
        if self.tools.pending_first:
            self.generated_during_call += 1
            self.tools.gate.set()
        return await super().generate(requests)


def test_trajectories_generate_while_others_wait_for_tools(codecs):
    """Mutant: ``run_many`` awaits the episodes one at a time (no generation overlaps a tool call)."""
    codec = codecs["qwen2_5_vl"]
    tools = GatedTools()
    engine = GateOpeningEngine(tools, codec, [format_tool_call(ROTATE_90, 0), ANSWER])
    loop = AgentLoop(engine, codec, tools, LoopSettings())
    trajectories = asyncio.run(loop.run_many([make_task("a"), make_task("b")], n_samples=2))
    assert [(t.uid, t.sample_index) for t in trajectories] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(t.stop_reason == "answer" for t in trajectories)
    assert engine.generated_during_call >= 1 and tools.calls == 4 and len(tools.closed) == 4


def test_at_most_max_concurrent_trajectories_run_at_once(codecs, sandbox_tools):
    """Mutant: ``run_many`` starts every episode at once (no limit)."""
    codec = codecs["qwen2_5_vl"]
    loop = AgentLoop(ScriptedEngine(codec, [ANSWER]), codec, sandbox_tools, LoopSettings(max_concurrent_trajectories=2))
    active, most = 0, 0
    run = loop.run

    async def counted(*args, **kwargs):
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            return await run(*args, **kwargs)
        finally:
            active -= 1

    loop.run = counted
    trajectories = asyncio.run(loop.run_many([make_task(f"t{i}") for i in range(3)], n_samples=2))
    assert len(trajectories) == 6 and most == 2


def test_tool_free_episode_has_no_schema_and_runs_no_call(codecs, processors, sandbox_tools):
    from cv_ray.agent.prompts import NO_TOOL_SYSTEM_PROMPT

    codec, processor = codecs["qwen2_5_vl"], processors["qwen2_5_vl"]
    text = format_tool_call(ROTATE_90, 0)  # a tool-trained model may still write a call
    task = make_task()
    loop = AgentLoop(ScriptedEngine(codec, [text, ANSWER]), codec, sandbox_tools, LoopSettings())
    t = asyncio.run(loop.run(task, use_tools=False))
    assert (t.stop_reason, t.num_turns, t.tool_calls) == ("no_tool_call", 1, [])
    messages = [{"role": "system", "content": NO_TOOL_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]},
                {"role": "assistant", "content": text}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert "# Tools" not in rendered
    expected = processor(text=[rendered], images=task.images, return_tensors="pt")["input_ids"][0].tolist()
    assert t.prompt_ids + t.response_ids == expected
