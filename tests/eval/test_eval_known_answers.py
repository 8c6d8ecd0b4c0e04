"""The evaluation's scoring on an engine whose answers are known: right answers score right, per transform.

A scripted engine recognises each task by its image and answers the orientation suite the way a
model would: on a turned image it first calls the code tool with the inverse turn (run in the real
sandbox), then answers. It answers correctly on every transform but one, which it gets wrong on
purpose, so the per-transform table has a known shape: 1.0 everywhere, 0.0 on that transform. The
episodes go through the real agent loop, the real reward (``score_group``), ``eval_record`` and
``summarize`` — the path of ``cv_ray.eval.runner.evaluate`` without its Ray actors.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from cv_ray.agent.chat import ChatCodec
from cv_ray.agent.config import LoopSettings
from cv_ray.agent.generation import GenerationOutput, GenerationRequest
from cv_ray.agent.loop import AgentLoop
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.data.suites import build_suite
from cv_ray.eval.metrics import summarize
from cv_ray.eval.runner import eval_record
from cv_ray.reward import outcome_from_trajectory, score_group
from cv_ray.reward.config import RewardConfig
from cv_ray.rollout.scripted_engine import SCRIPTED_LOGPROB, ScriptedEngine

#: The inverse of each turn the suite applies (counter-clockwise names, PIL's convention).
FIX = {"rotate_90": "ROTATE_270", "rotate_180": "ROTATE_180", "rotate_270": "ROTATE_90",
       "flip_horizontal": "FLIP_LEFT_RIGHT", "flip_vertical": "FLIP_TOP_BOTTOM"}
WRONG_ON = "rotate_180"


def _key(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


class KnowingEngine(ScriptedEngine):
    """Knows each task's answer and transform (by its image); fixes the image, then answers."""

    def __init__(self, codec: ChatCodec, tasks):
        super().__init__(codec, [])
        self.by_image = {_key(t.images[0]): t for t in tasks}

    async def _one(self, request: GenerationRequest) -> GenerationOutput:
        task = self.by_image[_key(request.images[0])]
        transform = task.extra["transform"]
        turn = self._turn_index(request.prompt_ids)
        if turn == 0 and transform in FIX:
            text = "<think>the image is turned</think>" + format_tool_call(
                f"result = image.transpose(Image.{FIX[transform]})", 0, "fix the orientation")
        else:
            answer = "certainly-wrong" if transform == WRONG_ON else task.answer
            text = f"<think>read it</think><answer>{answer}</answer>"
        ids = self.codec.tokenizer.encode(text, add_special_tokens=False) + [self.codec.end_of_turn_id]
        return GenerationOutput(ids, [SCRIPTED_LOGPROB] * len(ids), "stop")


@pytest.fixture(scope="module")
def records(codecs, sandbox_tools):
    tasks = build_suite("orientation", seed=5, base_questions=2, image_size=112)
    codec = codecs["qwen2_5_vl"]
    loop = AgentLoop(KnowingEngine(codec, tasks), codec, sandbox_tools, LoopSettings(max_turns=3))
    trajectories = asyncio.run(loop.run_many(tasks, n_samples=1))
    cfg = RewardConfig()
    return [eval_record(task, traj, score_group(task, [outcome_from_trajectory(traj)], cfg)[0], "orientation", True)
            for task, traj in zip(tasks, trajectories)]


def test_right_answers_score_right_per_transform(records):
    """Mutants: ``eval_record`` takes correctness from a reward term instead of the verdict (``fmt``:
    every well-formed answer counts as right), or files every record under one transform."""
    summary = summarize(records)
    transforms = {"identity", "rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"}
    assert set(summary["accuracy_by_transform"]) == transforms
    assert summary["accuracy_by_transform"] == {t: (0.0 if t == WRONG_ON else 1.0) for t in transforms}
    assert summary["n"] == 12 and summary["accuracy"] == pytest.approx(10 / 12)
    assert summary["accuracy_by_suite"] == {"orientation": pytest.approx(10 / 12)}


def test_the_fixes_count_as_the_required_ops(records):
    turned = [r for r in records if r.transform in FIX]
    assert all(r.tool_calls == 1 and r.tool_errors == {} for r in turned)
    assert all(set(r.required_ops) <= set(r.ops_used) for r in turned)
    assert all(r.tool_calls == 0 for r in records if r.transform == "identity")
    assert summarize(records)["op_recall"] == 1.0
