"""Readers (and a writer) for the reference release's data layouts, so users can bring their own data.

* RL / MVToolBench Parquet (verl layout): ``data_source``, ``prompt`` (chat list whose user text
  carries ``<image>`` markers), ``images`` (list of ``{bytes, path}``), ``reward_model.ground_truth``,
  ``extra_info`` {``answer``, ``bbox`` or ``bbox_2d``, ``question``, ``transform``, ``index``,
  ``split``, ``dataset_name``}. ``transform`` names the corruption applied to the image (a name, a
  list of names, JSON of a list, ``"none"``, empty or absent); each becomes its fix (``rotate_X``
  needs ``rotate_(360-X)``, flips are their own inverse; ``crop`` is kept as ``crop``). The box is
  ``bbox``, or ``bbox_2d`` when ``bbox`` is absent or null, taken as given: in the pixel frame of
  the image the model sees. The raw ``transform``, ``bbox`` and ``bbox_2d`` (and a ground truth
  that is not text) are kept in ``Task.extra["reference"]``: the reference-compatible reward reads
  them exactly as the reference does.
* LLaMA-Factory ShareGPT SFT JSON: ``conversations`` [{``from``: human | gpt | tool (also
  ``observation`` / ``function_call``), ``value``}], ``images`` (paths relative to the file),
  ``system``; ``<image>`` markers in values, in image order. Read and written.

Bad files and rows are handled as in ``files.py`` (readers take an optional ``SkippedRows``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from cv_ray.agent.prompts import TOOL_SCHEMA
from cv_ray.agent.tool_format import format_tool_call
from cv_ray.data.files import (
    DataFormatError,
    ImageDir,
    SkippedRows,
    convert_rows,
    decode_image,
    iter_jsonl_rows,
    iter_parquet_rows,
    load_image_file,
    read_json_array,
    require,
    require_box,
    skip_or_raise,
)
from cv_ray.types import SFTExample, Task

IMAGE_MARKER = "<image>"
REFERENCE_RL_COLUMNS = frozenset({"data_source", "prompt", "images", "reward_model", "extra_info"})
TASK_TYPES = ("ocr", "math", "count", "choice", "general")

_ROTATION = re.compile(r"^(?:rotate|rotation|rot)[_ ]?(90|180|270)$")
_FLIPS = {
    "flip_horizontal": "flip_horizontal", "horizontal_flip": "flip_horizontal", "hflip": "flip_horizontal",
    "flip_h": "flip_horizontal", "mirror": "flip_horizontal", "flip_lr": "flip_horizontal",
    "flip_vertical": "flip_vertical", "vertical_flip": "flip_vertical", "vflip": "flip_vertical",
    "flip_v": "flip_vertical", "flip_ud": "flip_vertical",
}
_NO_TRANSFORM = frozenset({"", "none", "identity", "original", "no", "null"})


def transform_fixes(transform: Any) -> list[str]:
    """The fixes for the reference's ``transform`` value (a name, a list of names, or JSON of a list).

    Corruptions applied in order are undone in reverse order. Raises ValueError on an unknown name, TypeError on a value of the wrong type.
    """
    if transform is None:
        return []
    if isinstance(transform, str):
        text = transform.strip()
        names = json.loads(text) if text.startswith("[") else [n for n in re.split(r"[,+;]", text)]
    elif isinstance(transform, (list, tuple)):
        names = list(transform)
    else:
        raise TypeError(f"expected a string or a list, got {type(transform).__name__}")
    fixes: list[str] = []
    for raw in reversed(names):
        if not isinstance(raw, str):
            raise TypeError(f"expected transform names, got {raw!r}")
        name = raw.strip().lower()
        if name in _NO_TRANSFORM:
            continue
        rotation = _ROTATION.match(name)
        if rotation:
            fixes.append(f"rotate_{360 - int(rotation.group(1))}")
        elif name in _FLIPS:
            fixes.append(_FLIPS[name])
        elif name in ("crop", "zoom"):
            fixes.append("crop")
        else:
            raise ValueError(f"unknown transform {raw!r} (known: rotate_90/180/270, flip_horizontal, "
                             "flip_vertical, crop, none)")
    return fixes


def _prompt_text(prompt: Any, path: Path, index: int) -> tuple[str, int]:
    """The user text without image markers, and the number of markers in the whole prompt."""
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise DataFormatError(path, index, "prompt", "expected a chat list [{role, content}, ...]")
    markers = 0
    user_text = ""
    for k, message in enumerate(prompt):
        content = message.get("content")
        if not isinstance(content, str):
            raise DataFormatError(path, index, f"prompt[{k}].content", "expected a string")
        markers += content.count(IMAGE_MARKER)
        if message.get("role") == "user":
            user_text = content.replace(IMAGE_MARKER, "").strip()
    return user_text, markers


def _reference_image(item: Any, path: Path, index: int, field: str) -> Image.Image:
    if not isinstance(item, dict):
        raise DataFormatError(path, index, field, "expected {bytes, path}")
    if item.get("bytes"):
        return decode_image(item["bytes"], path, index, field)
    if item.get("path"):
        file = Path(item["path"])
        return load_image_file(file if file.is_absolute() else path.parent / file, path, index, field)
    raise DataFormatError(path, index, field, "neither bytes nor path is set")


def _reference_task_type(data_source: str, extra: dict[str, Any]) -> str:
    declared = extra.get("task_type") or extra.get("ability")
    if isinstance(declared, str) and declared.lower() in TASK_TYPES:
        return declared.lower()
    source = data_source.lower()
    return next((t for t in ("ocr", "math") if t in source), "general")


def reference_row_to_task(row: dict[str, Any], path: Path, index: int) -> Task:
    data_source = require(row, "data_source", str, path, index)
    extra = require(row, "extra_info", dict, path, index)
    reward_model = require(row, "reward_model", dict, path, index)
    prompt_text, markers = _prompt_text(row.get("prompt"), path, index)
    raw_images = require(row, "images", list, path, index)
    if markers != len(raw_images):
        raise DataFormatError(path, index, "images", f"{len(raw_images)} images for {markers} <image> markers")
    raw_answer = reward_model.get("ground_truth", extra.get("answer"))
    answer = str(raw_answer) if isinstance(raw_answer, (int, float)) and not isinstance(raw_answer, bool) else raw_answer
    if not isinstance(answer, str):
        raise DataFormatError(path, index, "reward_model.ground_truth", "missing or not a string or number")
    try:
        required_ops = transform_fixes(extra.get("transform"))
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise DataFormatError(path, index, "extra_info.transform", str(error)) from error
    question = extra.get("question") or prompt_text
    if not isinstance(question, str) or not question:
        raise DataFormatError(path, index, "extra_info.question", "missing, and the prompt has no user text")
    dataset = extra.get("dataset_name") or data_source
    split = extra.get("split") if isinstance(extra.get("split"), str) else "train"
    raw = {k: v for k, v in extra.items() if k in _KEPT_EXTRA}
    if raw_answer is not answer:
        raw["ground_truth"] = raw_answer  # the reference's rules never match a number; keep the type
    return Task(
        uid=f"{dataset}-{split}-{extra.get('index', index)}", data_source=data_source, question=question,
        images=[_reference_image(item, path, index, f"images[{k}]") for k, item in enumerate(raw_images)],
        answer=answer, required_ops=required_ops, answer_box=_reference_box(extra, path, index),
        task_type=_reference_task_type(data_source, extra), split=split, extra={"reference": raw},
    )


#: ``extra_info`` fields kept as given in ``Task.extra["reference"]`` (what the reference's reward reads).
_KEPT_EXTRA = ("transform", "bbox", "bbox_2d", "index", "dataset_name")


def _reference_box(extra: dict[str, Any], path: Path, index: int) -> list[float] | None:
    """``bbox``, or ``bbox_2d`` when ``bbox`` is absent or null (a Parquet struct gives every row both
    fields once any row has them)."""
    field = "bbox" if extra.get("bbox") is not None else "bbox_2d"
    return require_box({f"extra_info.{field}": extra.get(field)}, f"extra_info.{field}", path, index)


def read_reference_rl(path: str | Path, skipped: SkippedRows | None = None) -> Iterator[Task]:
    """Stream Tasks from the reference's RL / MVToolBench Parquet layout (bad rows: see ``files.py``)."""
    path = Path(path)
    yield from convert_rows(iter_parquet_rows(path), lambda row, index: reference_row_to_task(row, path, index),
                            skipped)


# ----------------------------------------------------------------------------------------------------------------
# LLaMA-Factory ShareGPT

_FROM_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool",
              "observation": "tool", "function_call": "assistant", "system": "system"}
_ROLE_FROM = {"user": "human", "assistant": "gpt", "tool": "tool"}


def _content_to_value(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_MARKER if part.get("type") == "image" else part.get("text", "") for part in content)


def _value_to_content(value: str) -> str | list[dict[str, Any]]:
    """A value without markers stays a string; with markers it becomes image and text parts, in order."""
    if IMAGE_MARKER not in value:
        return value
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(value.split(IMAGE_MARKER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def example_to_sharegpt(example: SFTExample, image_paths: list[str]) -> dict[str, Any]:
    system = ""
    conversations = []
    for message in example.messages:
        if message["role"] == "system":
            system = _content_to_value(message["content"])
        else:
            conversations.append({"from": _ROLE_FROM[message["role"]], "value": _content_to_value(message["content"])})
    return {"id": example.uid, "task_uid": example.task_uid, "kind": example.kind, "conversations": conversations,
            "images": image_paths, "system": system, "tools": json.dumps([TOOL_SCHEMA["function"]])}


def sharegpt_to_example(record: dict[str, Any], path: Path, index: int) -> SFTExample:
    conversations = require(record, "conversations", list, path, index)
    messages: list[dict[str, Any]] = []
    system = require(record, "system", str, path, index, optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in _FROM_ROLE:
            raise DataFormatError(path, index, f"conversations[{k}].from",
                                  f"expected one of {', '.join(_FROM_ROLE)}, got {turn.get('from') if isinstance(turn, dict) else turn!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataFormatError(path, index, f"conversations[{k}].value", "expected a string")
        if turn["from"] == "function_call":  # LLaMA-Factory keeps the call JSON apart; we write it as text
            try:
                call = json.loads(value)
                value = format_tool_call(call["arguments"]["code"], int(call["arguments"].get("image_index", 0)),
                                         call["arguments"].get("description", ""))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise DataFormatError(path, index, f"conversations[{k}].value",
                                      f"function_call is not a code_image_tool call ({error})") from error
        messages.append({"role": _FROM_ROLE[turn["from"]], "content": _value_to_content(value)})
    image_paths = require(record, "images", list, path, index, optional=True) or []
    markers = sum(turn["value"].count(IMAGE_MARKER) for turn in conversations)
    if markers != len(image_paths):
        raise DataFormatError(path, index, "images", f"{len(image_paths)} images for {markers} <image> markers")
    images = []
    for k, item in enumerate(image_paths):
        if not isinstance(item, str):
            raise DataFormatError(path, index, f"images[{k}]", "expected a path")
        file = Path(item)
        images.append(load_image_file(file if file.is_absolute() else path.parent / file, path, index, f"images[{k}]"))
    uid = record.get("id") if isinstance(record.get("id"), str) else f"{path.stem}-{index}"
    kind = record.get("kind") if isinstance(record.get("kind"), str) else "imported"
    task_uid = record.get("task_uid") if isinstance(record.get("task_uid"), str) else ""
    return SFTExample(uid=uid, messages=messages, images=images, kind=kind, task_uid=task_uid)


def read_sharegpt(path: str | Path, skipped: SkippedRows | None = None) -> Iterator[SFTExample]:
    """ShareGPT records from a JSON array (``.json``) or one record per line (``.jsonl``)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from convert_rows(iter_jsonl_rows(path, skipped),
                                lambda record, index: sharegpt_to_example(record, path, index), skipped)
        return
    for index, record in enumerate(read_json_array(path)):
        if not isinstance(record, dict):
            skip_or_raise(DataFormatError(path, index, "<record>", "expected a JSON object"), skipped)
            continue
        try:
            example = sharegpt_to_example(record, path, index)
        except DataFormatError as error:
            skip_or_raise(error, skipped)
            continue
        yield example


def write_sharegpt(examples: Iterable[SFTExample], path: str | Path) -> int:
    """Write a ShareGPT JSON array; images go to ``<stem>_images/`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = ImageDir(path)
    records = [example_to_sharegpt(e, [image_dir.save(e.uid, k, im) for k, im in enumerate(e.images)])
               for e in examples]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(records)


def sharegpt_from_jsonl(jsonl_path: str | Path, json_path: str | Path) -> int:
    """Convert our SFT JSONL to ShareGPT JSON in the same directory, referencing the same image files
    (rows are streamed; images are never decoded)."""
    jsonl_path, json_path = Path(jsonl_path), Path(json_path)
    if jsonl_path.parent.resolve() != json_path.parent.resolve():
        raise ValueError(f"{json_path} must be in the same directory as {jsonl_path} to share its image files")
    records = []
    for index, row in iter_jsonl_rows(jsonl_path):
        messages = require(row, "messages", list, jsonl_path, index)
        image_paths = require(row, "images", list, jsonl_path, index)
        example = SFTExample(uid=require(row, "uid", str, jsonl_path, index), messages=messages, images=[],
                             kind=require(row, "kind", str, jsonl_path, index),
                             task_uid=require(row, "task_uid", str, jsonl_path, index))
        records.append(example_to_sharegpt(example, image_paths))
    json_path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(records)
