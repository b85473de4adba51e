"""The configured files: a path, folder, glob or LLaMA-Factory `dataset_info.json` resolved to sources, each
file read into examples and `Rejection`s, and the files' fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Example, Unit, location
from tunepipe.tasks.data.containers import CONTAINERS, DataFileError, DataSource, file_rows
from tunepipe.tasks.data.results import SourceCount
from tunepipe.tasks.data.shapes import (
    SHAPE_KEYS,
    Normaliser,
    RecordError,
    ShapeSpec,
    example_id,
    json_type,
    record_keys,
)

DATASET_INFO = "dataset_info.json"


class Rejection(BaseModel):
    """A row that was not used, with the original text so that nothing is lost."""

    source: str
    line: int
    unit: Unit = "line"
    field: str
    reason: str
    raw: str
    stage: Literal["load", "check", "format"] = "load"

    @property
    def message(self) -> str:
        """`data/train.jsonl:10: invalid JSON: …` or `data/alpaca.json row 2: missing field "output"`."""
        return f"{location(self.source, self.line, self.unit)}: {self.reason}"


@dataclass
class FileRead:
    examples: list[Example]
    rejections: list[Rejection]
    count: SourceCount


def read_file(source: DataSource, normaliser: Normaliser) -> FileRead:
    """Every row of one file as an Example or a Rejection; raises DataFileError if none can be used."""
    path = source.path
    if source.spec is not None:
        normaliser = Normaliser(source.spec, normaliser.system_prompt, normaliser.reasoning)
    unit, rows = file_rows(source)
    examples: list[Example] = []
    rejections: list[Rejection] = []
    kinds: Counter[str] = Counter()
    value_types: Counter[str] = Counter()
    for row in rows:
        try:
            if isinstance(row.value, RecordError):
                raise row.value
            if not isinstance(row.value, dict):
                value_types[json_type(row.value)] += 1
                raise RecordError(f"<{unit}>", f"expected a JSON object, got {json_type(row.value)}", kind="type")
            messages, label, rejected = normaliser.parts(row.value)
        except RecordError as exc:
            kinds[exc.kind] += 1
            rejections.append(
                Rejection(
                    source=str(path), line=row.number, unit=unit, field=exc.field, reason=exc.message, raw=row.raw
                )
            )
            continue
        examples.append(
            Example(
                id=example_id(messages, label, rejected),
                messages=messages,
                source=str(path),
                line=row.number,
                unit=unit,
                label=label,
                rejected=rejected,
            )
        )
    if not examples:
        _raise_if_unusable(path, rejections, kinds, value_types)
    count = SourceCount(
        source=str(path), unit=unit, rows_read=len(examples) + len(rejections), rows_rejected=len(rejections)
    )
    return FileRead(examples, rejections, count)


def _raise_if_unusable(path: Path, rejections: list[Rejection], kinds: Counter[str], types: Counter[str]) -> None:
    """A file whose every row fails for the same file-level cause gets one message naming that cause."""
    if not rejections:
        raise DataFileError(f"{path}: empty file: no records")
    n = len(rejections)
    if kinds["encoding"] == n:
        detail = rejections[0].reason.removeprefix("not valid UTF-8: ")
        raise DataFileError(f"{path}: not UTF-8 text (line {rejections[0].line}: {detail}); save it as UTF-8")
    if kinds["type"] == n:
        found = " and ".join(f"{kind}s" for kind in sorted(types))
        container = "a JSON array" if rejections[0].unit == "row" else "JSON Lines"
        raise DataFileError(f"{path}: {container} of {found}; expected JSON objects, one record each")
    if kinds["shape"] == n:
        keys = record_keys(json.loads(rejections[0].raw))
        raise DataFileError(
            f"{path}: unknown shape (the first record has keys {keys}); expected {SHAPE_KEYS}, "
            "or a LLaMA-Factory dataset_info.json that names the columns"
        )
    if kinds["json"] == n:
        raise DataFileError(f"{path}: no line is valid JSON (first: {rejections[0].message})")


def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def resolve_sources(spec: Path, key: str, datasets: Iterable[str] = ()) -> list[DataSource]:
    """The files `data.train`/`data.validation`/`data.eval` name: a file, a folder (or LLaMA-Factory folder) or a
    glob."""
    if spec.is_dir():
        if (spec / DATASET_INFO).is_file():
            return _llama_factory_sources(spec / DATASET_INFO, list(datasets))
        files = sorted(
            p
            for p in spec.rglob("*")
            if p.is_file()
            and p.suffix.lower() in CONTAINERS
            and not any(part.startswith(".") for part in p.relative_to(spec).parts)
        )
        if not files:
            raise DataFileError(f"{key}: {spec}: no data files in the folder (expected {', '.join(CONTAINERS)})")
        return [DataSource(path=p) for p in files]
    if spec.is_file():
        if spec.suffix.lower() not in CONTAINERS:
            raise DataFileError(
                f"{key}: {spec}: unsupported file type {spec.suffix or '(none)'!r}; expected {', '.join(CONTAINERS)}"
            )
        return [DataSource(path=spec)]
    if _has_glob(str(spec)):
        files = sorted(
            Path(p)
            for p in glob.glob(str(spec), recursive=True)
            if Path(p).is_file() and Path(p).suffix.lower() in CONTAINERS
        )
        if not files:
            raise DataFileError(f"{key}: {spec}: no data file matches")
        return [DataSource(path=p) for p in files]
    raise FileNotFoundError(f"{key}: file not found: {spec}")


def _llama_factory_sources(info_path: Path, names: list[str]) -> list[DataSource]:
    """The local datasets a LLaMA-Factory `dataset_info.json` describes (all, or the ones named)."""
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFileError(f"{info_path}: cannot be read: {exc}") from None
    if not isinstance(info, dict):
        raise DataFileError(f"{info_path}: expected an object of datasets, got {json_type(info)}")
    unknown = [name for name in names if name not in info]
    if unknown:
        raise DataFileError(
            f"{info_path}: no dataset named {', '.join(map(repr, unknown))} (data.datasets); "
            f"it has {', '.join(map(repr, info))}"
        )
    sources = []
    for name in names or list(info):
        entry = info[name]
        where = f"{info_path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise DataFileError(f"{where}: expected an object, got {json_type(entry)}")
        if "file_name" not in entry:
            remote = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry), None)
            raise DataFileError(
                f"{where}: no file_name"
                + (f" ({remote}: tunepipe reads local files only; download it and set file_name)" if remote else "")
            )
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt", "openai"):
            raise DataFileError(f"{where}: formatting {formatting!r} is not supported (alpaca, sharegpt, openai)")
        shape = ShapeSpec.default("openai" if formatting == "openai" else formatting)
        overrides = {**entry.get("columns", {}), **entry.get("tags", {})}
        unknown_keys = set(overrides) - set(ShapeSpec.model_fields)
        if unknown_keys:
            raise DataFileError(f"{where}: columns/tags {', '.join(sorted(unknown_keys))} are not supported")
        spec = shape.model_copy(update={**overrides, "ranking": bool(entry.get("ranking"))})
        target = info_path.parent / entry["file_name"]
        for source in resolve_sources(target, f"{where}: file_name"):
            sources.append(DataSource(path=source.path, spec=spec))
    return sources


def fingerprint_files(paths: Iterable[Path], extra: str) -> str:
    """sha256 over the bytes of `paths` (in order) and `extra`; any changed byte changes it."""
    digest = hashlib.sha256()
    for path in paths:
        # Length-prefixed, so moving bytes from one file to the next changes the fingerprint too.
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as data:
            for chunk in iter(lambda: data.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(extra.encode("utf-8"))
    return digest.hexdigest()
