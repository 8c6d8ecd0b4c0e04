"""Record formats: round trips, reference-layout fixtures, and errors that name file, row and field."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cv_ray.agent.prompts import SYSTEM_PROMPT
from cv_ray.data.compat import read_sharegpt, transform_fixes, write_sharegpt
from cv_ray.data.families import generate_task
from cv_ray.data.records import DataFormatError, read_sft, read_tasks, write_sft, write_tasks
from cv_ray.types import SFTExample


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _tasks():
    return [generate_task(f, 0, i, 96) for f in ("orientation", "zoom", "no_tool") for i in range(2)]


def _example(uid: str = "sft-x") -> SFTExample:
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (10, 20), (0, 0, 255))
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "<think>turn it</think>\n<tool_call>\n{}\n</tool_call>"},
        {"role": "tool", "content": "Error: name 'picture' is not defined"},
        {"role": "assistant", "content": "<think>again</think>\n<tool_call>\n{}\n</tool_call>"},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Image 1 (10x20) is the result."}]},
        {"role": "assistant", "content": "<think>done</think>\n<answer>red</answer>"},
    ]
    return SFTExample(uid=uid, messages=messages, images=[red, blue], kind="error_recovery", task_uid="t-1")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_tasks_round_trip(tmp_path, suffix):
    tasks = _tasks()
    path = tmp_path / f"tasks{suffix}"
    assert write_tasks(iter(tasks), path) == len(tasks)
    back = list(read_tasks(path))
    assert len(back) == len(tasks)
    for a, b in zip(tasks, back):
        assert (a.uid, a.data_source, a.question, a.answer, a.choices, a.required_ops, a.task_type, a.split) == \
               (b.uid, b.data_source, b.question, b.answer, b.choices, b.required_ops, b.task_type, b.split)
        assert a.answer_box == b.answer_box and a.extra == json.loads(json.dumps(b.extra))
        assert all(_same_image(x, y) for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_sft_round_trip(tmp_path, suffix):
    path = tmp_path / f"sft{suffix}"
    write_sft([_example("a"), _example("b")], path)
    back = list(read_sft(path))
    assert [e.uid for e in back] == ["a", "b"]
    assert back[0].messages == _example().messages and back[0].kind == "error_recovery" and back[0].task_uid == "t-1"
    assert all(_same_image(x, y) for x, y in zip(back[0].images, _example().images))


def test_sharegpt_round_trip_and_layout(tmp_path):
    path = tmp_path / "sft_sharegpt.json"
    write_sharegpt([_example()], path)
    record = json.loads(path.read_text())[0]
    assert record["system"] == SYSTEM_PROMPT
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "tool", "gpt", "tool", "gpt"]
    assert record["conversations"][0]["value"] == "<image>What is it?"
    assert len(record["images"]) == 2 and all((tmp_path / p).exists() for p in record["images"])
    back = next(iter(read_sft(path)))
    assert back.messages == _example().messages
    assert all(_same_image(x, y) for x, y in zip(back.images, _example().images))


def test_hand_written_llamafactory_fixture(tmp_path):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "g.png")
    records = [{
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "function_call", "value": json.dumps({"name": "code_image_tool",
                                                           "arguments": {"code": "result = image", "image_index": 0}})},
            {"from": "observation", "value": "<image>Image 1 (8x8) is the result."},
            {"from": "gpt", "value": "<think>green</think><answer>green</answer>"},
        ],
        "images": ["g.png", "g.png"], "system": "be brief",
    }]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    example = next(iter(read_sharegpt(path)))
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]
    assert '"code": "result = image"' in example.messages[2]["content"]
    assert example.messages[2]["content"].startswith("<tool_call>\n")
    assert len(example.images) == 2 and example.images[0].size == (8, 8)


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_rows(transform="rotate_90"):
    return [{
        "data_source": "mvtoolbench_ocr",
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "<image>\nRead the sign."}],
        "images": [{"bytes": _png((200, 10, 10)), "path": None}],
        "ability": "ocr",
        "reward_model": {"style": "rule", "ground_truth": "STOP"},
        "extra_info": {"answer": "STOP", "bbox": [4.0, 5.0, 20.0, 12.0], "question": "Read the sign.",
                       "transform": transform, "index": 7, "split": "test", "dataset_name": "mvtoolbench"},
    }]


def test_reference_rl_parquet_fixture(tmp_path):
    path = tmp_path / "ref.parquet"
    rows = _reference_rows("rotate_90") + _reference_rows("flip_horizontal") + _reference_rows("none")
    pq.write_table(pa.Table.from_pylist(rows), path)
    tasks = list(read_tasks(path))
    assert [t.required_ops for t in tasks] == [["rotate_270"], ["flip_horizontal"], []]
    task = tasks[0]
    assert task.answer == "STOP" and task.question == "Read the sign." and task.split == "test"
    assert task.answer_box == [4.0, 5.0, 20.0, 12.0] and task.uid == "mvtoolbench-test-7"
    assert task.task_type == "ocr" and task.images[0].size == (40, 30)


def test_transform_fixes_are_inverses():
    assert transform_fixes("rotate_90") == ["rotate_270"]
    assert transform_fixes("rotate_270") == ["rotate_90"]
    assert transform_fixes("rotation_180") == ["rotate_180"]
    assert transform_fixes(["rotate_90", "flip_vertical"]) == ["flip_vertical", "rotate_270"]
    assert transform_fixes('["hflip"]') == ["flip_horizontal"]
    assert transform_fixes(None) == [] and transform_fixes("identity") == []


def test_reference_unknown_transform_names_row_and_field(tmp_path):
    path = tmp_path / "ref.parquet"
    pq.write_table(pa.Table.from_pylist(_reference_rows("rotate_90") + _reference_rows("swirl")), path)
    with pytest.raises(DataFormatError) as error:
        list(read_tasks(path))
    assert (error.value.path, error.value.row, error.value.field) == (str(path), 1, "extra_info.transform")
    assert "swirl" in str(error.value) and "row 1" in str(error.value) and str(path) in str(error.value)


def test_malformed_parquet_row_names_file_row_field(tmp_path):
    path = tmp_path / "tasks.parquet"
    write_tasks(_tasks()[:3], path)
    table = pq.read_table(path)
    boxes = table.column("answer_box").to_pylist()
    boxes[2] = [1.0, 2.0, 3.0]
    pq.write_table(table.set_column(table.schema.get_field_index("answer_box"), "answer_box",
                                    pa.array(boxes, pa.list_(pa.float64()))), path)
    with pytest.raises(DataFormatError, match=r"tasks.parquet: row 2: field `answer_box`: expected 4 numbers"):
        list(read_tasks(path))


def test_malformed_jsonl_rows_name_file_row_field(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_tasks(_tasks()[:2], path)
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["answer"]
    path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=r"row 1: field `answer`: missing"):
        list(read_tasks(path))
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"row 1: field `<line>`: invalid JSON"):
        list(read_tasks(path))
    row = json.loads(lines[0])
    row["images"] = ["missing.png"]
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=r"row 0: field `images\[0\]`: cannot read image file"):
        list(read_tasks(path))


def test_sharegpt_image_count_mismatch_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image><image>hi"}], "images": []}]))
    with pytest.raises(DataFormatError, match=r"row 0: field `images`: 0 images for 2 <image> markers"):
        list(read_sft(path))
    path.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}], "images": []}]))
    with pytest.raises(DataFormatError, match=r"conversations\[0\].from"):
        list(read_sft(path))


def test_reading_streams_rows(tmp_path):
    path = tmp_path / "tasks.parquet"
    write_tasks(_tasks(), path)
    stream = read_tasks(path)
    first = next(stream)
    assert first.uid == _tasks()[0].uid
