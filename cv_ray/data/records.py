"""Our record formats for ``Task`` and ``SFTExample``: Parquet and JSONL, written and read as streams.

* Parquet: one row per record, images embedded as PNG bytes (``list<binary>``), ``extra`` /
  ``messages`` as JSON strings. Read with ``pyarrow`` ``iter_batches`` (never the whole file).
* JSONL: one JSON object per line, images as PNG files in ``<stem>_images/`` beside the file, named
  by path relative to the JSONL file. Read line by line.

``read_tasks`` / ``read_sft`` auto-detect our formats and the reference layouts (``compat.py``);
``read_task_files`` / ``read_sft_files`` read lists of files with ``data.skip_bad_rows``. A file
that cannot be read is a :class:`DataFileError`; a malformed row a :class:`DataFormatError` naming
the file, the row (0-based) and the field, or a skipped row (``files.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cv_ray.data.compat import REFERENCE_RL_COLUMNS, read_reference_rl, read_sharegpt
from cv_ray.data.files import (
    PARQUET_BATCH_ROWS,
    DataError,
    DataFileError,
    DataFormatError,
    ImageDir,
    SkippedRows,
    convert_rows,
    decode_image,
    iter_jsonl_rows,
    iter_parquet_rows,
    json_field,
    load_image_file,
    parquet_columns,
    png_bytes,
    require,
    require_box,
    require_str_list,
)
from cv_ray.types import SFTExample, Task

__all__ = ["DataError", "DataFileError", "DataFormatError", "SkippedRows", "read_sft", "read_sft_files", "read_task_files",
           "read_tasks", "write_sft", "write_tasks"]

log = logging.getLogger(__name__)

TASK_SCHEMA = pa.schema([
    ("uid", pa.string()), ("data_source", pa.string()), ("question", pa.string()), ("images", pa.list_(pa.binary())),
    ("answer", pa.string()), ("choices", pa.list_(pa.string())), ("required_ops", pa.list_(pa.string())),
    ("answer_box", pa.list_(pa.float64())), ("task_type", pa.string()), ("split", pa.string()),
    ("extra", pa.string()),
])
SFT_SCHEMA = pa.schema([
    ("uid", pa.string()), ("messages", pa.string()), ("images", pa.list_(pa.binary())), ("kind", pa.string()),
    ("task_uid", pa.string()),
])


# ----------------------------------------------------------------------------------------------------------------
# Task rows


def _task_row(task: Task, images: list[Any], extra_as_text: bool) -> dict[str, Any]:
    return {"uid": task.uid, "data_source": task.data_source, "question": task.question, "images": images,
            "answer": task.answer, "choices": task.choices, "required_ops": list(task.required_ops),
            "answer_box": None if task.answer_box is None else [float(v) for v in task.answer_box],
            "task_type": task.task_type, "split": task.split,
            "extra": json.dumps(task.extra, sort_keys=True) if extra_as_text else task.extra}


def _row_task(row: dict[str, Any], load: Callable[[Any, str], Image.Image], path: str | Path, index: int) -> Task:
    raw_images = require(row, "images", list, path, index)
    if not raw_images:
        raise DataFormatError(path, index, "images", "a task needs at least one image")
    choices = require_str_list(row, "choices", path, index, optional=True)
    return Task(
        uid=require(row, "uid", str, path, index), data_source=require(row, "data_source", str, path, index),
        question=require(row, "question", str, path, index),
        images=[load(item, f"images[{k}]") for k, item in enumerate(raw_images)],
        answer=require(row, "answer", str, path, index), choices=choices,
        required_ops=require_str_list(row, "required_ops", path, index),
        answer_box=require_box(row, "answer_box", path, index),
        task_type=require(row, "task_type", str, path, index), split=require(row, "split", str, path, index),
        extra=json_field(row, "extra", dict, path, index),
    )


def _sft_row(example: SFTExample, images: list[Any], messages_as_text: bool) -> dict[str, Any]:
    return {"uid": example.uid, "messages": json.dumps(example.messages) if messages_as_text else example.messages,
            "images": images, "kind": example.kind, "task_uid": example.task_uid}


def count_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def _row_sft(row: dict[str, Any], load: Callable[[Any, str], Image.Image], path: str | Path, index: int) -> SFTExample:
    messages = json_field(row, "messages", list, path, index)
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataFormatError(path, index, f"messages[{k}]", "expected {role: system|user|assistant|tool, ...}")
        if not isinstance(message.get("content"), (str, list)):
            raise DataFormatError(path, index, f"messages[{k}].content", "expected a string or a list of parts")
    raw_images = require(row, "images", list, path, index)
    if count_image_parts(messages) != len(raw_images):
        raise DataFormatError(path, index, "images",
                              f"{len(raw_images)} images for {count_image_parts(messages)} image placeholders")
    return SFTExample(uid=require(row, "uid", str, path, index), messages=messages,
                      images=[load(item, f"images[{k}]") for k, item in enumerate(raw_images)],
                      kind=require(row, "kind", str, path, index), task_uid=require(row, "task_uid", str, path, index))


# ----------------------------------------------------------------------------------------------------------------
# writers


def _write_parquet(rows: Iterable[dict[str, Any]], path: Path, schema: pa.Schema) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == PARQUET_BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _suffix(path: Path) -> str:
    if path.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .parquet or .jsonl")
    return path.suffix


def write_tasks(tasks: Iterable[Task], path: str | Path) -> int:
    """Write tasks to ``.parquet`` or ``.jsonl`` (images beside it); returns the number written."""
    path = Path(path)
    if _suffix(path) == ".parquet":
        return _write_parquet((_task_row(t, [png_bytes(im) for im in t.images], True) for t in tasks), path,
                              TASK_SCHEMA)
    images = ImageDir(path)
    return _write_jsonl((_task_row(t, [images.save(t.uid, k, im) for k, im in enumerate(t.images)], False)
                         for t in tasks), path)


def write_sft(examples: Iterable[SFTExample], path: str | Path) -> int:
    """Write SFT examples to ``.parquet`` or ``.jsonl`` (images beside it); returns the number written."""
    path = Path(path)
    if _suffix(path) == ".parquet":
        return _write_parquet((_sft_row(e, [png_bytes(im) for im in e.images], True) for e in examples), path,
                              SFT_SCHEMA)
    images = ImageDir(path)
    return _write_jsonl((_sft_row(e, [images.save(e.uid, k, im) for k, im in enumerate(e.images)], False)
                         for e in examples), path)


# ----------------------------------------------------------------------------------------------------------------
# readers


def _parquet_loader(path: Path, index: int) -> Callable[[Any, str], Image.Image]:
    def load(item: Any, field: str) -> Image.Image:
        if not isinstance(item, bytes):
            raise DataFormatError(path, index, field, f"expected PNG bytes, got {type(item).__name__}")
        return decode_image(item, path, index, field)
    return load


def _file_loader(path: Path, index: int) -> Callable[[Any, str], Image.Image]:
    def load(item: Any, field: str) -> Image.Image:
        if not isinstance(item, str):
            raise DataFormatError(path, index, field, f"expected an image path, got {type(item).__name__}")
        return load_image_file(path.parent / item, path, index, field)
    return load


def _unknown_suffix(path: Path, known: str) -> DataFileError:
    return DataFileError(path, f"unknown data format {path.suffix!r}", f"Use {known} (the suffix picks the reader).")


def read_tasks(path: str | Path, skipped: SkippedRows | None = None) -> Iterator[Task]:
    """Stream tasks from our Parquet/JSONL or the reference's RL/MVToolBench Parquet layout.

    A malformed row raises DataFormatError, or is recorded in ``skipped`` and passed over when given.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        if REFERENCE_RL_COLUMNS <= parquet_columns(path):
            yield from read_reference_rl(path, skipped)
            return
        yield from convert_rows(iter_parquet_rows(path),
                                lambda row, index: _row_task(row, _parquet_loader(path, index), path, index), skipped)
    elif path.suffix == ".jsonl":
        yield from convert_rows(iter_jsonl_rows(path, skipped),
                                lambda row, index: _row_task(row, _file_loader(path, index), path, index), skipped)
    else:
        raise _unknown_suffix(path, ".parquet or .jsonl")


def read_sft(path: str | Path, skipped: SkippedRows | None = None) -> Iterator[SFTExample]:
    """Stream SFT examples from our Parquet/JSONL or LLaMA-Factory ShareGPT JSON (``.json``, or
    ``.jsonl`` with one ShareGPT record per line). Bad rows as in :func:`read_tasks`."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from convert_rows(iter_parquet_rows(path),
                                lambda row, index: _row_sft(row, _parquet_loader(path, index), path, index), skipped)
    elif path.suffix == ".jsonl":
        rows = iter_jsonl_rows(path, SkippedRows())  # the layout is the first readable row's
        first = next(rows, None)
        rows.close()
        if first is not None and "conversations" in first[1]:
            yield from read_sharegpt(path, skipped)
            return
        yield from convert_rows(iter_jsonl_rows(path, skipped),
                                lambda row, index: _row_sft(row, _file_loader(path, index), path, index), skipped)
    elif path.suffix == ".json":
        yield from read_sharegpt(path, skipped)
    else:
        raise _unknown_suffix(path, ".parquet, .jsonl or .json")


def _read_files(paths: Sequence[str | Path], read: Callable[[Path, SkippedRows | None], Iterator[Any]],
                skip_bad_rows: bool) -> list[Any]:
    skipped = SkippedRows() if skip_bad_rows else None
    records = [record for path in paths for record in read(Path(path), skipped)]
    if skipped is not None and skipped.count:
        log.warning(skipped.summary())
    return records


def read_task_files(paths: Sequence[str | Path], skip_bad_rows: bool = False) -> list[Task]:
    """Every task of ``paths``; with ``skip_bad_rows`` (``data.skip_bad_rows``) malformed rows are
    skipped, counted and the first few logged, and every other row is kept."""
    return _read_files(paths, read_tasks, skip_bad_rows)


def read_sft_files(paths: Sequence[str | Path], skip_bad_rows: bool = False) -> list[SFTExample]:
    """Every SFT example of ``paths``; bad rows as in :func:`read_task_files`."""
    return _read_files(paths, read_sft, skip_bad_rows)
