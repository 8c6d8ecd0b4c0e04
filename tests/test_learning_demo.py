"""The learning demo's task family and its sandbox-executed SFT trajectories.

The demo family (cv_ray/data/demo_family.py): the answer is the colour of the top-left quadrant
once the image is upright; the required ops undo the turn and crop that quadrant, whose box
(``answer_box``, task-image frame) the sandbox's reported crop must match.
"""

from __future__ import annotations

import numpy as np

from cv_ray.data.content import PALETTE
from cv_ray.data.corruptions import apply_corruptions
from cv_ray.data.demo_family import COLOURS, generate_demo_example, generate_demo_task

SYSTEM_PROMPT = "Fix the image with code_image_tool, then answer inside <answer> </answer>."


def test_demo_tasks_need_the_rotation_and_answer_the_upright_top_left_colour():
    tasks = [generate_demo_task(0, i, 112, "train") for i in range(40)]
    assert {t.extra["transform"] for t in tasks} == {"none", "rotate_90", "rotate_180", "rotate_270"}
    assert {t.answer for t in tasks} == set(COLOURS)
    for task in tasks:
        turn_fix = [op for op in task.required_ops if op != "crop"]
        assert task.required_ops[-1] == "crop" and (turn_fix == []) == (task.extra["transform"] == "none")
        fixed, box = apply_corruptions(task.images[0], task.answer_box,
                                       [{"name": op, "params": {}} for op in turn_fix])
        pixels = np.asarray(fixed.convert("RGB"))
        luma = pixels.astype(float).mean(axis=(1, 2))
        assert (luma[0:7] < luma[7:14].min()).all(), task.uid  # the fix puts the dark halves on top
        assert [int(v) for v in box] == [0, 0, 56, 56], task.uid  # the answer box is the upright top-left
        assert (pixels[7:14, 0:56] == PALETTE[task.answer]).all(), task.uid  # a bright half-stripe
    again = generate_demo_task(0, 7, 112, "train")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tasks[7].images[0]))


def test_demo_trajectories_run_the_fix_in_the_sandbox_and_crop_the_answer_box():
    from cv_ray.data.trajectories import verify_example
    from cv_ray.geometry import iou
    from cv_ray.sandbox.config import SandboxConfig
    from cv_ray.sandbox.pool import SandboxPool

    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=5.0, memory_mb=1024)) as pool:
        for i in range(6):
            task = generate_demo_task(0, i, 112, "sft")
            example = generate_demo_example(task, pool, SYSTEM_PROMPT)
            assert verify_example(example, pool) == [], example.uid
            assert example.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
            assert example.messages[-1]["content"].endswith(f"<answer>{task.answer}</answer>")
            tool_output = np.asarray(example.images[1].convert("RGB"))
            assert tool_output.shape == (56, 56, 3) and (tool_output[7:14] == PALETTE[task.answer]).all()
            # The crop the sandbox reports, mapped into the task image's frame, is the answer box.
            result = pool.run(task_code(example), images=[task.images[0]])
            (crop,) = [op for op in result.ops if op["op"] == "crop"]
            assert iou(crop["box"], task.answer_box) > 0.99, (crop, task.answer_box)


def task_code(example) -> str:
    from cv_ray.agent.tool_parser import parse_tool_calls

    (call,) = parse_tool_calls(example.messages[2]["content"])
    return call.code
