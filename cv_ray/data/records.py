"""Our record formats for ``Task`` and ``SFTExample``: Parquet and JSONL, written and read as streams.

* Parquet: one row per record, images embedded as PNG bytes (``list<binary>``), ``extra`` /
  ``messages`` as JSON strings. Read with ``pyarrow`` ``iter_batches`` (never the whole file).
* JSONL: one JSON object per line, images as PNG files in ``<stem>_images/`` beside the file, named
  by path relative to the JSONL file. Read line by line.

A malformed row raises :class:`DataFormatError` naming the file, the row (0-based) and the field.
``read_tasks`` / ``read_sft`` auto-detect our formats and the reference layouts (``compat``).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cv_ray.types import SFTExample, Task

PNG_COMPRESS_LEVEL = 1
"""zlib level for stored PNGs: level 1 is ~5x faster to write than 6 for ~20% more bytes."""
PARQUET_BATCH_ROWS = 64

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


class DataFormatError(ValueError):
    """A record in a data file is malformed. The message names the file, the row and the field."""

    def __init__(self, path: str | Path, row: int, field: str, problem: str):
        self.path, self.row, self.field = str(path), row, field
        super().__init__(f"{path}: row {row}: field `{field}`: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_image(data: bytes, path: str | Path, row: int, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFormatError(path, row, field, f"not a readable image ({error})") from error
    return image


def load_image_file(file: Path, path: str | Path, row: int, field: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFormatError(path, row, field, f"cannot read image file {file} ({error})") from error


def _safe_name(uid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", uid)[:120]


class ImageDir:
    """Writes the PNG files of a JSONL dataset into ``<stem>_images/`` and names them relative to the file."""

    def __init__(self, jsonl_path: Path):
        self.base = jsonl_path.parent
        self.dir = jsonl_path.parent / f"{jsonl_path.stem}_images"
        self.dir.mkdir(parents=True, exist_ok=True)

    def relative(self, uid: str, index: int) -> str:
        """The file name of image ``index`` of record ``uid``, relative to the data file."""
        return f"{self.dir.name}/{_safe_name(uid)}_{index}.png"

    def save(self, uid: str, index: int, image: Image.Image) -> str:
        name = self.relative(uid, index)
        image.save(self.base / name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return name


# ----------------------------------------------------------------------------------------------------------------
# field checks shared by every reader


def require(row: dict[str, Any], field: str, kinds: type | tuple[type, ...], path: str | Path, index: int,
            optional: bool = False) -> Any:
    """``row[field]`` checked against ``kinds``; raises DataFormatError naming file, row and field."""
    if field not in row or row[field] is None:
        if optional:
            return None
        raise DataFormatError(path, index, field, "missing")
    value = row[field]
    if not isinstance(value, kinds):
        expected = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise DataFormatError(path, index, field, f"expected {expected}, got {type(value).__name__}")
    return value


def require_str_list(row: dict[str, Any], field: str, path: str | Path, index: int,
                     optional: bool = False) -> list[str] | None:
    values = require(row, field, list, path, index, optional)
    if values is not None and not all(isinstance(v, str) for v in values):
        raise DataFormatError(path, index, field, "expected a list of strings")
    return values


def require_box(row: dict[str, Any], field: str, path: str | Path, index: int) -> list[float] | None:
    box = require(row, field, list, path, index, optional=True)
    if box is None:
        return None
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise DataFormatError(path, index, field, f"expected 4 numbers [x1, y1, x2, y2], got {box!r}")
    box = [float(v) for v in box]
    if box[2] < box[0] or box[3] < box[1]:
        raise DataFormatError(path, index, field, f"box {box} has x2 < x1 or y2 < y1")
    return box


def _json_field(row: dict[str, Any], field: str, kind: type, path: str | Path, index: int) -> Any:
    """A field stored as JSON text in Parquet and as a native value in JSONL."""
    value = row.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, index, field, f"invalid JSON ({error.msg})") from error
    if not isinstance(value, kind):
        raise DataFormatError(path, index, field, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


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
        extra=_json_field(row, "extra", dict, path, index),
    )


def _sft_row(example: SFTExample, images: list[Any], messages_as_text: bool) -> dict[str, Any]:
    return {"uid": example.uid, "messages": json.dumps(example.messages) if messages_as_text else example.messages,
            "images": images, "kind": example.kind, "task_uid": example.task_uid}


def count_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def _row_sft(row: dict[str, Any], load: Callable[[Any, str], Image.Image], path: str | Path, index: int) -> SFTExample:
    messages = _json_field(row, "messages", list, path, index)
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


def iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, row dict)`` streamed batch by batch."""
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, row dict)`` line by line; blank lines are skipped but keep their row number."""
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(path, index, "<line>", f"invalid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise DataFormatError(path, index, "<line>", "expected a JSON object")
            yield index, row


def parquet_columns(path: Path) -> set[str]:
    return set(pq.ParquetFile(path).schema_arrow.names)


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


def read_tasks(path: str | Path) -> Iterator[Task]:
    """Stream tasks from our Parquet/JSONL or the reference's RL/MVToolBench Parquet layout."""
    from cv_ray.data.compat import REFERENCE_RL_COLUMNS, read_reference_rl

    path = Path(path)
    if path.suffix == ".parquet":
        if REFERENCE_RL_COLUMNS <= parquet_columns(path):
            yield from read_reference_rl(path)
            return
        for index, row in iter_parquet_rows(path):
            yield _row_task(row, _parquet_loader(path, index), path, index)
    elif path.suffix == ".jsonl":
        for index, row in iter_jsonl_rows(path):
            yield _row_task(row, _file_loader(path, index), path, index)
    else:
        raise ValueError(f"{path}: unknown task file format {path.suffix!r}; use .parquet or .jsonl")


def read_sft(path: str | Path) -> Iterator[SFTExample]:
    """Stream SFT examples from our Parquet/JSONL or LLaMA-Factory ShareGPT JSON (``.json``)."""
    from cv_ray.data.compat import read_sharegpt

    path = Path(path)
    if path.suffix == ".parquet":
        for index, row in iter_parquet_rows(path):
            yield _row_sft(row, _parquet_loader(path, index), path, index)
    elif path.suffix == ".jsonl":
        for index, row in iter_jsonl_rows(path):
            if "conversations" in row:  # ShareGPT written one record per line
                yield from read_sharegpt(path)
                return
            yield _row_sft(row, _file_loader(path, index), path, index)
    elif path.suffix == ".json":
        yield from read_sharegpt(path)
    else:
        raise ValueError(f"{path}: unknown SFT file format {path.suffix!r}; use .parquet, .jsonl or .json")
