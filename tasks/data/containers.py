"""Containers (JSON Lines, JSON arrays, CSV, Parquet): each file's rows, numbered, with the raw text kept and
the parsed record or the `RecordError` that stopped it; a file that cannot be read at all raises `DataFileError`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Unit
from tunepipe.tasks.data.shapes import RecordError, ShapeSpec

CONTAINERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class DataFileError(ValueError):
    """A data file (or folder, glob, dataset_info.json) that cannot be used at all."""


class DataSource(BaseModel):
    """One file to read, and the shape its records have (None: `data.shape`, or detected per record)."""

    path: Path
    spec: ShapeSpec | None = None


@dataclass
class RawRow:
    number: int
    raw: str
    value: Any  # the parsed record, or the RecordError that stopped it


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN/Infinity, which are not JSON and would make invalid answers downstream.
    raise ValueError(f"{name} is not valid JSON")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return RecordError("<line>", f"invalid JSON: {exc.msg} (column {exc.colno})", kind="json")
    except ValueError as exc:
        return RecordError("<line>", f"invalid JSON: {exc}", kind="json")


def _decode(path: Path, data: bytes) -> str:
    """The whole file as text; a file that is not UTF-8 cannot be used at all."""
    if data.startswith(UTF16_BOMS):
        raise DataFileError(f"{path}: UTF-16 text (byte-order mark {data[:2].hex(' ').upper()}); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def _jsonl_rows(path: Path, data: bytes) -> Iterator[RawRow]:
    if data.startswith(UTF16_BOMS):
        _decode(path, data)
    # Bytes, split on "\n" only, so line numbers match an editor's and one badly encoded line costs one row.
    for number, raw_bytes in enumerate(data.split(b"\n"), start=1):
        raw_bytes = raw_bytes.removesuffix(b"\r")
        if number == 1:
            raw_bytes = raw_bytes.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        raw = raw_bytes.decode("utf-8", "backslashreplace")
        if not raw.strip():
            continue
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = f"not valid UTF-8: byte 0x{raw_bytes[exc.start]:02x} at byte {exc.start + 1} of the line"
            yield RawRow(number, raw, RecordError("<line>", error, kind="encoding"))
            continue
        yield RawRow(number, raw, _json_value(text))


def _json_array_rows(path: Path, data: bytes) -> Iterator[RawRow]:
    text = _decode(path, data)
    try:
        records = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise DataFileError(
            f"{path}: invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno}); a JSON array must parse "
            "as a whole"
        ) from None
    except ValueError as exc:
        raise DataFileError(f"{path}: invalid JSON: {exc}") from None
    for number, record in enumerate(records, start=1):
        yield RawRow(number, json.dumps(record, ensure_ascii=False), record)


def _json_lines_in_json_file(path: Path, data: bytes) -> Iterator[RawRow]:
    """LLaMA-Factory (and many exports) write JSON Lines into `.json` files; one pretty-printed object is not."""
    rows = list(_jsonl_rows(path, data))
    if len(rows) > 1 and isinstance(rows[0].value, RecordError):
        try:
            whole = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None
        if isinstance(whole, dict):
            raise DataFileError(f"{path}: one JSON object, expected an array of records or one record per line")
    yield from rows


def _csv_rows(path: Path, data: bytes, spec: ShapeSpec | None) -> Iterator[RawRow]:
    """CSV with a header row; cells of chat, history and tools columns hold JSON text."""
    reader = csv.DictReader(io.StringIO(_decode(path, data), newline=""))
    json_columns = {"messages", "conversations", "history", "tools"}
    if spec is not None:
        json_columns = {spec.messages, spec.history, spec.tools} - {None}
    for number, row in enumerate(reader, start=1):
        raw = json.dumps(row, ensure_ascii=False)
        if None in row:
            n_header = len(reader.fieldnames)
            error = RecordError("<row>", f"{n_header + len(row[None])} cells, the header has {n_header}")
            yield RawRow(number, raw, error)
            continue
        yield RawRow(number, raw, _csv_record(row, json_columns))


def _csv_record(row: dict[str, str], json_columns: set[str]) -> dict[str, Any] | RecordError:
    record: dict[str, Any] = dict(row)
    for column in sorted(json_columns & record.keys()):
        if record[column]:
            parsed = _json_value(record[column])
            if isinstance(parsed, RecordError):
                return RecordError(column, f'field "{column}": {parsed.message} in the CSV cell')
            record[column] = parsed
    return record


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file: {exc}") from None
    for number, record in enumerate(records, start=1):
        yield RawRow(number, json.dumps(record, ensure_ascii=False, default=str), record)


def file_rows(source: DataSource) -> tuple[Unit, Iterator[RawRow]]:
    path = source.path
    container = CONTAINERS.get(path.suffix.lower())
    if container == "parquet":
        return "row", _parquet_rows(path)
    data = path.read_bytes()
    if container == "csv":
        return "row", _csv_rows(path, data, source.spec)
    if container == "json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "row", _json_array_rows(path, data)
    if container == "json":
        return "line", _json_lines_in_json_file(path, data)
    return "line", _jsonl_rows(path, data)
