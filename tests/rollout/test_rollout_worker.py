"""RolloutWorker actors on a local Ray cluster: task order, health, weight updates, batch metrics."""

from __future__ import annotations

import math

import pytest
import torch
from rollout_testlib import noise_image

from cv_ray.models import ModelRef
from cv_ray.rollout.config import RolloutConfig
from cv_ray.rollout.metrics import batch_metrics
from cv_ray.rollout.rollout_worker import RolloutGroup, split_evenly
from cv_ray.types import Task, Trajectory


def test_split_evenly():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_batch_metrics_hand_computed():
    def traj(turns, stop, **metrics):
        return Trajectory(uid="u", sample_index=0, prompt_ids=[], response_ids=[], response_mask=[],
                          rollout_logprobs=[], images=[], model_images=[], image_to_origin=[], image_parent=[],
                          num_turns=turns, stop_reason=stop, metrics=metrics)

    batch = [traj(3, "answer", tool_calls=2.0, tool_errors=1.0, **{"tool_errors/runtime": 1.0}, generation_s=1.5,
                  tool_s=0.5, response_tokens=100.0, sampled_tokens=60.0),
             traj(1, "max_tokens", tool_calls=0.0, tool_errors=0.0, generation_s=0.5, tool_s=0.0,
                  response_tokens=40.0, sampled_tokens=40.0)]
    m = batch_metrics(batch, wall_s=2.0)
    # turns (3 + 1) / 2 = 2; calls (2 + 0) / 2 = 1; tokens (100 + 40) / 2 = 70; times are sums.
    assert m["rollout/turns_mean"] == 2.0 and m["rollout/tool_calls_mean"] == 1.0
    assert m["rollout/response_tokens_mean"] == 70.0 and m["rollout/sampled_tokens"] == 100.0
    assert m["rollout/generation_s"] == 2.0 and m["rollout/tool_s"] == 0.5
    assert m["rollout/tool_errors/runtime"] == 1.0 and m["rollout/tool_errors"] == 1.0
    assert m["rollout/stop/answer"] == 0.5 and m["rollout/stop/max_tokens"] == 0.5


@pytest.mark.slow
def test_rollout_group_on_local_ray(ray_local, tiny_qwen25):
    from transformers import AutoModelForImageTextToText

    from cv_ray.sandbox import SandboxGroup
    from cv_ray.sandbox.config import SandboxConfig

    sandbox = SandboxGroup(SandboxConfig(num_executors=1, workers_per_executor=1))
    cfg = RolloutConfig(num_workers=2, n_samples=2, max_turns=2, max_new_tokens_per_turn=8, cpus_per_worker=1)
    # The run's image bounds (model.max_pixels below the tiny checkpoint's own 50,176): a 200 x 160
    # task image must reach the model as the bounded processor sees it, in the codec and the engine alike.
    model = ModelRef(str(tiny_qwen25), min_pixels=3136, max_pixels=12544)
    group = RolloutGroup(model, cfg, sandbox)
    try:
        health = group.health()
        assert [h["engine"] for h in health] == ["hf", "hf"] and all(h["weight_version"] == 0 for h in health)

        tasks = [Task(uid=f"t{i}", data_source="test", question="What?", images=[noise_image(200, 160, i)], answer="1")
                 for i in range(3)]
        trajectories, metrics = group.rollout(tasks)
        assert [(t.uid, t.sample_index) for t in trajectories] == [(f"t{i}", k) for i in range(3) for k in range(2)]
        assert metrics["rollout/trajectories"] == 6 and metrics["rollout/wall_s"] > 0
        # Mutant: the worker or its engine loads the processor without the bounds (the engine would then
        # refuse the prompt's image tokens, or both would expand the image to the checkpoint's count).
        def image_tokens(processor) -> int:
            grid = processor.image_processor(images=tasks[0].images, return_tensors="pt")["image_grid_thw"][0]
            return int(grid.prod()) // processor.image_processor.merge_size ** 2

        bounded = model.load_processor()
        image_id = bounded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert trajectories[0].prompt_ids.count(image_id) == image_tokens(bounded)
        assert image_tokens(bounded) < image_tokens(ModelRef(str(tiny_qwen25)).load_processor())

        # Zero the output head: every allowed token then has log-prob -log(vocab - banned placeholders).
        model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25)
        weights = {"lm_head.weight": torch.zeros_like(model.lm_head.weight)}
        assert group.update_weights(weights) == [1, 1]
        trajectories, _ = group.rollout(tasks[:1], n_samples=1)
        expected = -math.log(model.config.text_config.vocab_size - 4)
        sampled = [lp for lp, m in zip(trajectories[0].rollout_logprobs, trajectories[0].response_mask) if m]
        assert sampled and all(abs(lp - expected) < 1e-5 for lp in sampled)

        with pytest.raises(Exception, match="not in"):
            group.update_weights({"no.such.weight": torch.zeros(1)})
    finally:
        group.shutdown()
        sandbox.shutdown()
