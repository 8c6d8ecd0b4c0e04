"""Every reader against bad input: unreadable files, malformed rows, and ``skip_bad_rows``; and the
reference layout's box and transform forms (``bbox_2d``; a list, a string, ``"none"``, empty, absent).

Readers: our task Parquet and JSONL, our SFT Parquet and JSONL, the reference's RL Parquet, and
LLaMA-Factory ShareGPT (``.json`` array and ``.jsonl``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cv_ray.data.compat import write_sharegpt
from cv_ray.data.families import generate_task
from cv_ray.data.records import (
    DataFileError,
    DataFormatError,
    SkippedRows,
    read_sft,
    read_sft_files,
    read_task_files,
    read_tasks,
    write_sft,
    write_tasks,
)
from cv_ray.types import SFTExample


def _png(color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_row(index: int, **extra) -> dict:
    info = {"answer": "STOP", "question": "Read the sign.", "index": index, "split": "train", "dataset_name": "ref",
            **extra}
    return {"data_source": "mvtoolbench_ocr",
            "prompt": [{"role": "user", "content": "<image>\nRead the sign."}],
            "images": [{"bytes": _png(), "path": None}],
            "reward_model": {"style": "rule", "ground_truth": "STOP"}, "extra_info": info}


def _write_reference(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _example(uid: str) -> SFTExample:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "<think>red</think>\n<answer>red</answer>"}]
    return SFTExample(uid=uid, messages=messages, images=[Image.new("RGB", (20, 10), (255, 0, 0))], kind="no_tool")


# ----------------------------------------------------------------------------------------------------------------
# the reference layout's forms


@pytest.mark.parametrize("transform, fixes", [
    (["rotate_90", "crop"], ["crop", "rotate_270"]),       # a list: undone last-first
    ("rotate_90", ["rotate_270"]),                          # a plain string
    ("none", []),
    ("", []),
])
def test_reference_transform_forms(tmp_path, transform, fixes):
    (task,) = read_tasks(_write_reference(tmp_path / "ref.parquet", [_reference_row(0, transform=transform,
                                                                                     bbox=[1.0, 2.0, 3.0, 4.0])]))
    assert task.required_ops == fixes
    assert task.extra["reference"]["transform"] == transform  # kept as given for the compat reward


def test_reference_transform_absent(tmp_path):
    (task,) = read_tasks(_write_reference(tmp_path / "ref.parquet", [_reference_row(0)]))
    assert task.required_ops == [] and task.answer_box is None
    assert "transform" not in task.extra["reference"]


def test_reference_box_from_bbox_2d(tmp_path):
    """Mutant: the reader takes only ``bbox`` (a bbox_2d row reads as no box, so any crop scored IoU 1)."""
    only_2d = _write_reference(tmp_path / "only.parquet", [_reference_row(0, bbox_2d=[4.0, 5.0, 20.0, 12.0])])
    assert next(read_tasks(only_2d)).answer_box == [4.0, 5.0, 20.0, 12.0]
    # both fields in the file (a Parquet struct gives every row both): each row's non-null one
    both = _write_reference(tmp_path / "both.parquet", [
        _reference_row(0, bbox=[1.0, 1.0, 9.0, 9.0], bbox_2d=None),
        _reference_row(1, bbox=None, bbox_2d=[2.0, 2.0, 8.0, 8.0])])
    first, second = read_tasks(both)
    assert (first.answer_box, second.answer_box) == ([1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 8.0, 8.0])
    assert second.extra["reference"] == {"index": 1, "dataset_name": "ref", "bbox": None,
                                         "bbox_2d": [2.0, 2.0, 8.0, 8.0]}


def test_reference_bad_bbox_2d_names_its_field(tmp_path):
    path = _write_reference(tmp_path / "ref.parquet", [_reference_row(0, bbox_2d=[1.0, 2.0, 3.0])])
    with pytest.raises(DataFormatError, match=r"row 0: field `extra_info.bbox_2d`: expected 4 numbers"):
        list(read_tasks(path))


def test_reference_number_ground_truth_is_kept(tmp_path):
    row = _reference_row(0)
    row["reward_model"]["ground_truth"] = 12
    (task,) = read_tasks(_write_reference(tmp_path / "ref.parquet", [row]))
    assert task.answer == "12" and task.extra["reference"]["ground_truth"] == 12


# ----------------------------------------------------------------------------------------------------------------
# every reader: unreadable files


def _our_tasks(path: Path, n: int = 3) -> Path:
    write_tasks([generate_task("no_tool", 0, i, 64) for i in range(n)], path)
    return path


READERS = {
    "tasks.parquet": (lambda p: _our_tasks(p), read_tasks),
    "tasks.jsonl": (lambda p: _our_tasks(p), read_tasks),
    "sft.parquet": (lambda p: write_sft([_example("a"), _example("b"), _example("c")], p), read_sft),
    "sft.jsonl": (lambda p: write_sft([_example("a"), _example("b"), _example("c")], p), read_sft),
    "reference.parquet": (lambda p: _write_reference(p, [_reference_row(i, transform="none") for i in range(3)]),
                          read_tasks),
    "sharegpt.json": (lambda p: write_sharegpt([_example("a"), _example("b"), _example("c")], p), read_sft),
}


@pytest.mark.parametrize("name", list(READERS))
def test_missing_file_is_one_paragraph_naming_the_file_and_the_fix(tmp_path, name):
    _, read = READERS[name]
    path = tmp_path / name
    with pytest.raises(DataFileError) as error:
        list(read(path))
    message = str(error.value)
    assert str(path) in message and "no such file" in message and "data.train_files" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["tasks.parquet", "sft.parquet", "reference.parquet"])
def test_corrupt_parquet_is_a_file_error_not_a_pyarrow_traceback(tmp_path, name):
    """Mutant: the reader opens the file with pyarrow unguarded (a raw ArrowInvalid naming no file)."""
    make, read = READERS[name]
    path = tmp_path / name
    make(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the footer is gone
    with pytest.raises(DataFileError) as error:
        list(read(path))
    assert str(path) in str(error.value) and "not a Parquet file" in str(error.value)
    assert "write it again" in str(error.value) and "\n" not in str(error.value)


def test_parquet_that_breaks_off_midway_names_the_last_good_row(tmp_path):
    path = _our_tasks(tmp_path / "tasks.parquet", n=130)  # row groups of 64 rows
    metadata = pq.ParquetFile(path).metadata
    offset = metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = bytes(b ^ 0xFF for b in data[offset:offset + 40])
    path.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match=r"breaks off after row 63"):
        list(read_tasks(path))


def test_sharegpt_json_that_is_not_json_or_not_utf8(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('[{"conversations": [}]')
    with pytest.raises(DataFileError, match=r"invalid JSON .* line 1") as error:
        list(read_sft(path))
    assert str(path) in str(error.value) and ".jsonl" in str(error.value)
    path.write_bytes(b'[{"conversations": "\xff"}]')
    with pytest.raises(DataFileError, match="not UTF-8"):
        list(read_sft(path))
    path.write_text('{"conversations": []}')
    with pytest.raises(DataFileError, match="expected a JSON array"):
        list(read_sft(path))


def test_unknown_suffix_is_a_file_error(tmp_path):
    with pytest.raises(DataFileError, match=r"unknown data format '.csv'.*Use .parquet or .jsonl"):
        list(read_tasks(tmp_path / "tasks.csv"))


# ----------------------------------------------------------------------------------------------------------------
# every reader: a malformed row names file, row and field; skip_bad_rows skips it and keeps the rest


def _break_row(name: str, path: Path) -> str:
    """Make row 1 of the file malformed; return the field the error must name."""
    if name == "tasks.jsonl" or name == "sft.jsonl":
        lines = path.read_text().splitlines()
        row = json.loads(lines[1])
        row["uid"] = 5
        lines[1] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")
        return "uid"
    if name == "sharegpt.json":
        records = json.loads(path.read_text())
        records[1]["conversations"][0]["from"] = "robot"
        path.write_text(json.dumps(records))
        return "conversations[0].from"
    table = pq.read_table(path)
    rows = table.to_pylist()
    if name == "reference.parquet":
        rows[1]["extra_info"]["transform"] = "swirl"
        field = "extra_info.transform"
    else:
        rows[1]["images"] = [b"not an image"]
        field = "images[0]"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return field


@pytest.mark.parametrize("name", list(READERS))
def test_malformed_row_names_file_row_and_field(tmp_path, name):
    make, read = READERS[name]
    path = tmp_path / name
    make(path)
    field = _break_row(name, path)
    with pytest.raises(DataFormatError) as error:
        list(read(path))
    assert (error.value.path, error.value.row, error.value.field) == (str(path), 1, field)


@pytest.mark.parametrize("name", list(READERS))
def test_skipping_bad_rows_counts_them_and_keeps_every_other_row(tmp_path, name):
    """Mutant: a skipped row ends the file (the rows after it are lost)."""
    make, read = READERS[name]
    path = tmp_path / name
    make(path)
    expected = len(list(read(path)))
    field = _break_row(name, path)
    skipped = SkippedRows()
    kept = list(read(path, skipped))
    assert len(kept) == expected - 1 and skipped.count == 1
    assert f"row 1: field `{field}`" in skipped.listed[0]


def test_skipped_rows_keep_the_first_five_messages_and_count_all(tmp_path, caplog):
    path = tmp_path / "tasks.jsonl"
    _our_tasks(path, n=2)
    good = path.read_text().splitlines()
    path.write_bytes(("\n".join([good[0]] + ["{broken"] * 7 + [good[1]]) + "\n").encode() + b"\xff\xfe\n")
    tasks = read_task_files([path], skip_bad_rows=True)
    assert [t.uid for t in tasks] == [json.loads(line)["uid"] for line in good]
    summary = caplog.records[-1].getMessage()
    assert "skipped 8 malformed data row(s)" in summary and summary.count("invalid JSON") == 5
    with pytest.raises(DataFormatError, match=r"row 1: field `<line>`: invalid JSON"):
        read_task_files([path])
    with pytest.raises(DataFileError):  # a file that cannot be read at all still stops the run
        read_sft_files([tmp_path / "missing.jsonl"], skip_bad_rows=True)
