"""SFT trajectories executed in the real sandbox: they replay to the same images, errors are real."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cv_ray.agent.prompts import SYSTEM_PROMPT
from cv_ray.agent.tool_parser import parse_tool_calls
from cv_ray.data.build import build_dataset
from cv_ray.data.code_styles import CROP_STYLES, ENHANCE_STYLES, ORIENTATION_STYLES
from cv_ray.data.config import DataConfig
from cv_ray.data.families import FAMILIES, generate_task
from cv_ray.data.records import count_image_parts, read_sft, read_tasks
from cv_ray.data.trajectories import (
    ERROR_KINDS,
    SFT_KINDS,
    choose_kind,
    error_kinds_for,
    example_rng,
    generate_example,
    plan_calls,
    verify_example,
)

SIZE = 192


@pytest.fixture(scope="module")
def pool():
    from cv_ray.sandbox.config import SandboxConfig
    from cv_ray.sandbox.pool import SandboxPool

    with SandboxPool(SandboxConfig(workers_per_executor=2, timeout_s=5.0, memory_mb=1024)) as sandbox:
        yield sandbox


def _examples(pool, seed=0, per_family=3):
    out = []
    for family in FAMILIES:
        for i in range(per_family):
            task = generate_task(family, seed, i, SIZE, "sft")
            rng = example_rng(seed, i)
            out.append((task, generate_example(task, pool, rng, choose_kind(task, rng, 0.3))[0]))
    return out


@pytest.fixture(scope="module")
def examples(pool):
    return _examples(pool)


def test_every_trajectory_replays_to_the_same_tool_images(pool, examples):
    for _, example in examples:
        assert verify_example(example, pool) == [], example.uid


def test_conversation_layout(examples):
    kinds = set()
    for task, example in examples:
        kinds.add(example.kind)
        messages = example.messages
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert messages[1]["content"][-1] == {"type": "text", "text": task.question}
        assert count_image_parts(messages) == len(example.images)
        assert np.array_equal(np.asarray(example.images[0]), np.asarray(task.images[0]))
        for message in messages[2:]:
            if message["role"] == "assistant":
                assert message["content"].startswith("<think>")
                assert len(parse_tool_calls(message["content"])) <= 1
        assert messages[-1]["content"].endswith(f"<answer>{task.answer}</answer>")
        assert parse_tool_calls(messages[-1]["content"]) == []
        if example.kind == "no_tool":
            assert len(messages) == 3 and not task.required_ops
        if example.kind == "multi_crop":
            assert sum(1 for m in messages if m["role"] == "tool") == 2
    assert kinds <= set(SFT_KINDS) and {"single_tool", "no_tool", "multi_tool"} <= kinds


def test_generation_is_deterministic_by_seed(pool, examples):
    again = _examples(pool)
    for (_, a), (_, b) in zip(examples, again):
        assert a.messages == b.messages
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def test_crops_contain_the_answer_region(pool):
    for family in ("zoom", "multi_op"):
        for i in range(4):
            task = generate_task(family, 1, i, SIZE, "sft")
            calls = plan_calls(task, example_rng(1, i))
            box = calls[-1].box_after
            width, height = calls[-1].output_size
            # The planned box of the answer lies inside the final crop output.
            assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
            example, _ = generate_example(task, pool, example_rng(1, i), choose_kind(task, example_rng(1, i), 0.0))
            assert example.images[-1].size == (width, height)


@pytest.mark.parametrize("error_kind", ERROR_KINDS)
def test_error_recovery_shows_a_real_sandbox_error_then_the_fix(pool, error_kind):
    family = "zoom" if error_kind == "crop_order" else "orientation"
    for i in range(30):
        task = generate_task(family, 2, i, SIZE, "sft")
        if error_kind in error_kinds_for(plan_calls(task, example_rng(2, i))[0]):
            break
    else:
        pytest.fail(f"no task whose first call can show {error_kind}")
    example, counts = generate_example(task, pool, example_rng(2, i), "error_recovery", error_kind)
    assert example.kind == "error_recovery"
    tool_messages = [m for m in example.messages if m["role"] == "tool"]
    first = tool_messages[0]["content"]
    assert isinstance(first, str) and first.startswith("Error: ")
    expected_class = {"name_error": "runtime", "image_index": "image_index", "no_result": "no_result",
                      "crop_order": "runtime"}[error_kind]
    assert counts["errors"] == {expected_class: 1}
    assert all(isinstance(m["content"], list) for m in tool_messages[1:])
    assert verify_example(example, pool) == []


def _every_style():
    for op, styles in {**ORIENTATION_STYLES, **ENHANCE_STYLES}.items():
        for name, style in styles.items():
            yield op, name, style("image")
    for name, style in CROP_STYLES.items():
        yield "crop", name, style("img", [10, 20, 60, 45], 3)


@pytest.mark.parametrize(("op", "style", "code"), list(_every_style()), ids=lambda v: v if "\n" not in v else "")
def test_sandbox_traces_every_code_style_as_its_op(pool, op, style, code):
    # The reward checks required_ops against the ops the sandbox traced: every style we teach must
    # be recognised as the op it is meant to be.
    image = generate_task("degraded", 0, 0, 96).images[0]
    result = pool.run(code, images=[image], image_index=0)
    assert result.ok, result.error
    assert op in [o["op"] for o in result.ops], (style, result.ops)


def test_build_dataset_writes_every_part(pool, tmp_path):
    cfg = DataConfig(seed=3, num_rl_tasks=10, num_val_tasks=5, num_sft_trajectories=10, suite_size=1,
                     image_size=128)
    manifest = build_dataset(cfg, tmp_path, pool)
    assert manifest["counts"]["rl_train"] == 10 and manifest["counts"]["sft"] == 10
    assert manifest["counts"]["suites"]["orientation-v1"] == 6
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    train = list(read_tasks(tmp_path / "rl_train.parquet"))
    assert [t.uid for t in train] == [generate_task(f, 3, 0, 128).uid for f in FAMILIES] + \
        [generate_task(f, 3, 1, 128).uid for f in FAMILIES]
    assert len(list(read_tasks(tmp_path / "rl_val.parquet"))) == 5
    ours = list(read_sft(tmp_path / "sft.jsonl"))
    shared = list(read_sft(tmp_path / "sft_sharegpt.json"))
    assert [e.messages for e in ours] == [e.messages for e in shared]
    assert sum(manifest["sft"]["kinds"].values()) == 10
    assert manifest["sft"]["required_ops_not_traced"] == 0
    for example in ours[:4]:
        assert verify_example(example, pool) == []
    for name in manifest["counts"]["suites"]:
        assert len(list(read_tasks(tmp_path / "suites" / f"{name}.parquet"))) == manifest["counts"]["suites"][name]


def test_build_dataset_of_the_demo_task_keeps_the_rl_variants_asked_for(pool, tmp_path):
    """The quickstart's data: the demo family alone, RL tasks (train and validation) upright only, SFT
    trajectories of every turn under the rollout's system prompt. Mutant: the variant filter ignored."""
    cfg = DataConfig(seed=2, families=["corner_orientation"], rl_variants=["none"], num_rl_tasks=4, num_val_tasks=3,
                     num_sft_trajectories=6, image_size=112)
    manifest = build_dataset(cfg, tmp_path, pool, system_prompt="Fix it, then answer.")
    assert manifest["counts"] == {"rl_train": 4, "rl_val": 3, "sft": 6}
    for split, n in (("rl_train", 4), ("rl_val", 3)):
        tasks = list(read_tasks(tmp_path / f"{split}.parquet"))
        assert len(tasks) == n and {t.extra["variant"] for t in tasks} == {"none"}
        assert all(t.required_ops == ["crop"] for t in tasks)
    sft = list(read_sft(tmp_path / "sft.jsonl"))
    assert {e.messages[0]["content"] for e in sft} == {"Fix it, then answer."}
    assert len({e.task_uid for e in sft}) == 6


def test_an_unknown_rl_variant_is_refused_with_the_key():
    from cv_ray.data.demo_family import generate_demo_task, of_variants

    tasks = (generate_demo_task(0, i) for i in range(100))
    with pytest.raises(ValueError, match="data.rl_variants"):
        next(of_variants(tasks, ["upside_down"], max_skipped=50))

