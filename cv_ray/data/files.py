"""What every data reader shares: errors that name the file (and the row and field), the optional
skipping of bad rows, field checks, image bytes and files, and row streams over Parquet and JSONL.

Data files are user input, so this is a trust boundary with two kinds of failure:

* :class:`DataFileError` — the file cannot be read at all (missing, not Parquet, truncated, not
  UTF-8 JSON): one paragraph naming the file, what is wrong and how to fix it. Always fatal.
* :class:`DataFormatError` — one row is malformed: names the file, the row (0-based) and the field.
  Fatal, unless the reader was given a :class:`SkippedRows`, which counts it, keeps the first few
  messages, and lets the reader go on with the next row (``data.skip_bad_rows``).

Imported by ``records.py`` (our formats) and ``compat.py`` (the reference's layouts), never the
other way round.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PNG_COMPRESS_LEVEL = 1
"""zlib level for stored PNGs: level 1 is ~5x faster to write than 6 for ~20% more bytes."""
PARQUET_BATCH_ROWS = 64
#: How many skipped rows a SkippedRows keeps the message of.
LISTED_SKIPS = 5

T = TypeVar("T")


class DataError(ValueError):
    """A data file or one of its rows is unusable."""


class DataFormatError(DataError):
    """A record in a data file is malformed. The message names the file, the row and the field."""

    def __init__(self, path: str | Path, row: int, field: str, problem: str):
        self.path, self.row, self.field = str(path), row, field
        super().__init__(f"{path}: row {row}: field `{field}`: {problem}")


class DataFileError(DataError):
    """A data file cannot be read at all. The message names the file, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"cannot read data file {path}: {problem}. {fix}")


_FIX_MISSING = ("Check the path (relative paths are resolved from the directory the run starts in) in "
                "data.train_files / data.sft_files, or build the dataset with trainer.stage=data.")
_FIX_PARQUET = ("The file is not a readable Parquet file (truncated, corrupt, or another format with a .parquet "
                "name): write it again, e.g. with pyarrow.parquet.write_table, or remove it from the file list.")
_FIX_TEXT = "Save it again as UTF-8 text, or remove it from the file list."


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _open_error(path: Path, error: OSError) -> DataFileError:
    if isinstance(error, FileNotFoundError):
        return DataFileError(path, "no such file", _FIX_MISSING)
    if isinstance(error, IsADirectoryError):
        return DataFileError(path, "it is a directory", "Give the path of a data file inside it.")
    if isinstance(error, PermissionError):
        return DataFileError(path, "permission denied", "Make the file readable by the user running the job.")
    return DataFileError(path, f"the system refused to read it ({_one_line(error)})", _FIX_MISSING)


class SkippedRows:
    """Malformed rows skipped instead of stopping the reader: counted, the first few messages kept."""

    def __init__(self, listed: int = LISTED_SKIPS):
        self.count = 0
        self.listed: list[str] = []
        self._max_listed = listed

    def record(self, error: DataFormatError) -> None:
        self.count += 1
        if len(self.listed) < self._max_listed:
            self.listed.append(str(error))

    def summary(self) -> str:
        """One message for the log: how many rows were skipped and the first few errors."""
        head = f"skipped {self.count} malformed data row(s) (data.skip_bad_rows=true); the first {len(self.listed)}:"
        return "\n  ".join([head, *self.listed])


def skip_or_raise(error: DataFormatError, skipped: SkippedRows | None) -> None:
    """Raise ``error``, or record it when the reader skips bad rows."""
    if skipped is None:
        raise error
    skipped.record(error)


def convert_rows(rows: Iterator[tuple[int, dict[str, Any]]], convert: Callable[[dict[str, Any], int], T],
                 skipped: SkippedRows | None) -> Iterator[T]:
    """``convert(row, index)`` for every row; a row it finds malformed is raised or skipped."""
    for index, row in rows:
        try:
            item = convert(row, index)
        except DataFormatError as error:
            skip_or_raise(error, skipped)
            continue
        yield item


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


def json_field(row: dict[str, Any], field: str, kind: type, path: str | Path, index: int) -> Any:
    """A field stored as JSON text in Parquet and as a native value in JSONL."""
    value = row.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, index, field, f"invalid JSON ({error.msg})") from error
        except RecursionError as error:
            raise DataFormatError(path, index, field, "JSON nested too deep") from error
    if not isinstance(value, kind):
        raise DataFormatError(path, index, field, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# row streams


def parquet_file(path: Path) -> pq.ParquetFile:
    """The opened Parquet file, or a DataFileError that says what is wrong with it."""
    try:
        return pq.ParquetFile(path)
    except OSError as error:
        if path.exists() and not path.is_dir() and not isinstance(error, PermissionError):
            raise DataFileError(path, f"not a Parquet file ({_one_line(error)})", _FIX_PARQUET) from error
        raise _open_error(path, error) from error
    except pa.ArrowException as error:
        raise DataFileError(path, f"not a Parquet file ({_one_line(error)})", _FIX_PARQUET) from error


def parquet_columns(path: Path) -> set[str]:
    return set(parquet_file(path).schema_arrow.names)


def iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, row dict)`` streamed batch by batch. A file that breaks off midway (a corrupt
    page) is a DataFileError naming the last good row: its rows cannot be told apart any more."""
    index = 0
    batches = parquet_file(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as error:
            raise DataFileError(path, f"the data breaks off after row {index - 1} ({_one_line(error)})",
                                _FIX_PARQUET) from error
        for row in batch.to_pylist():
            yield index, row
            index += 1


def iter_jsonl_rows(path: Path, skipped: SkippedRows | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, row dict)`` line by line; blank lines are skipped but keep their row number. A
    line that is not a UTF-8 JSON object is a malformed row (raised, or skipped into ``skipped``)."""
    try:
        lines = path.open("rb")
    except OSError as error:
        raise _open_error(path, error) from error
    with lines:
        for index, raw in enumerate(lines):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                skip_or_raise(DataFormatError(path, index, "<line>", f"not UTF-8 text ({error.reason} at byte "
                                                                     f"{error.start})"), skipped)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:
                problem = f"invalid JSON ({error.msg})" if isinstance(error, json.JSONDecodeError) else "nested too deep"
                skip_or_raise(DataFormatError(path, index, "<line>", problem), skipped)
                continue
            if not isinstance(row, dict):
                skip_or_raise(DataFormatError(path, index, "<line>", "expected a JSON object"), skipped)
                continue
            yield index, row


def read_json_array(path: Path) -> list[Any]:
    """A whole-file JSON array (ShareGPT ``.json``), or a DataFileError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise _open_error(path, error) from error
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"not UTF-8 text ({error.reason} at byte {error.start})", _FIX_TEXT) from error
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(path, f"invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
                            "Fix the JSON (one array of records), or write one record per line as .jsonl so that "
                            "data.skip_bad_rows can skip the bad ones.") from error
    if not isinstance(records, list):
        raise DataFileError(path, f"expected a JSON array of records, got a {type(records).__name__}",
                            "Wrap the records in [ ... ].")
    return records
