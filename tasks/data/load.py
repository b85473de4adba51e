"""Load user data in any supported container and shape and normalise it to canonical `Example`s.

Containers: JSON Lines (`.jsonl`, `.ndjson`), JSON arrays (`.json`; a `.json` file of JSON Lines works too),
CSV and Parquet; a folder or glob of them; UTF-8 with or without a byte-order mark, LF or CRLF line ends.
A LLaMA-Factory data folder is read through its `dataset_info.json` (`file_name`, `formatting`, `columns`,
`tags`).

Shapes (detected per record, or named by `data.shape`):
  pairs     {"input": str, "output": str | object | array, "system"?: str, "reasoning"?: str}
  alpaca    {"instruction": str, "input"?: str, "output": ..., "system"?: str, "history"?: [[q, a], ...]}
  sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...], "system"?, "tools"?}
  openai    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  trl       {"prompt": str | [messages], "completion": str | [one assistant message], "label"?: bool} (KTO when
            labelled), {"prompt": ..., "chosen": ..., "rejected": ...} (DPO): TRL's preference formats
A JSON object or array answer is written compactly with its key order kept. Preference rows are
examples too: KTO rows carry `label` (desirable or not), DPO rows `rejected` (the chosen answer is the final
message); LLaMA-Factory's `kto_tag` column and `ranking: true` datasets (`chosen`/`rejected`) read the same way.

Nothing is dropped silently: a row that cannot be turned into a conversation becomes a `Rejection` naming
the file, the line (JSON Lines) or row (arrays, CSV, Parquet), the field and the problem, with the original
text kept, and goes to a quarantine file. A file that cannot be used at all (not UTF-8, empty, an array of
non-objects, no record of a known shape) raises `DataFileError` naming the file and the cause.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.data.examples import Example, Message, Unit, location, split_reasoning, write_jsonl
from tasks.data.results import HeldOutSplit, LoadedData, Side, SourceCount
from tasks.runtime.caching import STAGE_CACHE, stage_dir
from tasks.runtime.config import DataConfig

CONTAINERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_INFO = "dataset_info.json"
REASONING_FIELDS = ("reasoning_content", "reasoning")  # OpenAI-compatible APIs and most R1-style exports
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
Shape = Literal["pairs", "alpaca", "sharegpt", "openai", "trl"]
SHAPE_KEYS = ("'messages' (openai), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), "
              "'input' + 'output' (pairs) or 'prompt' + 'completion' / 'chosen' + 'rejected' (trl)")
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}  # CSV cells carry booleans as text


class DataFileError(ValueError):
    """A data file (or folder, glob, dataset_info.json) that cannot be used at all."""


class RecordError(ValueError):
    """One record that cannot be used; `field` is a path into it such as `messages[2].role`.

    `kind` groups errors that, when every row of a file has them, mean the file itself is unusable.
    """

    def __init__(self, field: str, message: str, kind: str = "record") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.kind = kind


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


class ShapeSpec(BaseModel):
    """Which keys of a record hold what: the defaults of a shape, or a LLaMA-Factory `columns`/`tags` entry."""

    model_config = ConfigDict(frozen=True)

    shape: Shape
    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    system: str | None = "system"
    history: str | None = "history"
    messages: str = "conversations"
    tools: str | None = "tools"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    kto_tag: str | None = None  # LLaMA-Factory: the column saying whether the answer is desirable (KTO)
    ranking: bool = False  # LLaMA-Factory `ranking: true`: `chosen` and `rejected` answers (DPO)
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def default(cls, shape: Shape) -> ShapeSpec:
        if shape == "pairs":
            return cls(shape=shape, prompt="input", query=None, history=None)
        if shape == "openai":
            return cls(shape=shape, **OPENAI_TAGS)
        return cls(shape=shape)


OPENAI_TAGS = dict(messages="messages", role_tag="role", content_tag="content", user_tag="user",
                   assistant_tag="assistant", observation_tag="tool", function_tag="function")


class DataSource(BaseModel):
    """One file to read, and the shape its records have (None: `data.shape`, or detected per record)."""

    path: Path
    spec: ShapeSpec | None = None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text(record: dict[str, Any], key: str, field: str | None = None) -> str:
    """`record[key]` as a string (possibly empty: the data check names empty turns), or a RecordError."""
    field = field or key
    if key not in record:
        raise RecordError(field, f'missing field "{field}"')
    value = record[key]
    if value is None:
        raise RecordError(field, f'field "{field}" is null')
    if not isinstance(value, str):
        raise RecordError(field, f'field "{field}" must be a string, got {_json_type(value)}')
    return value


def _optional_text(record: dict[str, Any], key: str | None) -> str | None:
    # Exports often carry `"system": ""` or `"input": ""` to mean "none", so empty counts as absent.
    if key is None or record.get(key) in (None, ""):
        return None
    return _text(record, key)


def _answer_text(record: dict[str, Any], key: str) -> str:
    """A pairs/alpaca answer: a string as is, a JSON object or array written compactly in its key order."""
    if isinstance(record.get(key), (dict, list)):
        return json.dumps(record[key], ensure_ascii=False, separators=(",", ":"))
    if key in record and record[key] is not None and not isinstance(record[key], str):
        raise RecordError(key, f'field "{key}" must be a string or a JSON object, got {_json_type(record[key])}')
    return _text(record, key)


def _reasoning_field(obj: dict[str, Any], where: str) -> tuple[str, str | None]:
    for key in REASONING_FIELDS:
        if obj.get(key) not in (None, ""):
            field = f"{where}.{key}" if where else key
            return field, _text(obj, key, field)
    return "", None


def apply_reasoning(answer: str, answer_field: str, policy: str, reasoning: str | None = None,
                    field: str = "") -> str:
    """The assistant text under `data.reasoning` (see DataConfig.reasoning), from the answer in `answer_field`
    and a reasoning field `field`, if any."""
    inline, rest = split_reasoning(answer)
    if inline is not None and not answer.lstrip().startswith("<think>"):
        # Evaluation would take the text before it for reasoning, and strip would drop it.
        raise RecordError(answer_field, f'field "{answer_field}" has a </think> with no <think> before it, so the '
                                        "text before it would be taken for reasoning and not trained as the answer; "
                                        "open the block with <think> or remove the stray </think>")
    if policy == "strip":
        return rest
    if reasoning is not None:
        if policy == "keep":
            raise RecordError(field, f'field "{field}" would be lost with data.reasoning: keep; set data.reasoning '
                                     "to wrap (train on it) or strip (drop it)")
        if inline is not None:
            raise RecordError(field, f'field "{field}" and a <think> block in the answer: keep only one')
        inline = reasoning
    if policy == "keep" or inline is None:
        return answer
    return f"<think>\n{inline}\n</think>\n\n{rest}"


@dataclass(frozen=True)
class Normaliser:
    """Turns one record into messages: shape (fixed or detected), system prompt and reasoning policy."""

    spec: ShapeSpec | None  # None: detect per record
    system_prompt: str | None = None
    reasoning: str = "keep"

    def messages(self, record: dict[str, Any]) -> list[Message]:
        return self.parts(record)[0]

    def parts(self, record: dict[str, Any]) -> tuple[list[Message], bool | None, str | None]:
        """(messages, KTO label, DPO rejected answer) of one record; both None for an SFT record."""
        spec = self.spec or _detect(record)
        label, rejected = None, None
        if spec.shape == "trl":
            messages, label, rejected = self._trl(record)
        elif spec.ranking:
            messages, rejected = self._ranked(record, spec)
        elif spec.shape in ("sharegpt", "openai"):
            messages = self._chat(record, spec)
        else:
            messages = self._instruction(record, spec)
        if spec.kto_tag is not None:
            label = _label(record, spec.kto_tag)
        if self.system_prompt and messages and messages[0].role != "system":
            messages.insert(0, Message(role="system", content=self.system_prompt))
        return messages, label, rejected

    def _trl(self, record: dict[str, Any]) -> tuple[list[Message], bool | None, str | None]:
        """TRL's prompt-completion (with `label`: KTO) and paired (`chosen`/`rejected`: DPO) formats."""
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            spec = ShapeSpec(shape="openai", **{**OPENAI_TAGS, "messages": "prompt"})
            messages = self._chat({"prompt": prompt}, spec)
        else:
            messages = [Message(role="user", content=_text(record, "prompt"))]
        paired = "chosen" in record or "rejected" in record
        answer = self._completion(record, "chosen" if paired else "completion")
        rejected = self._completion(record, "rejected") if paired else None
        label = _label(record, "label") if not paired and "label" in record else None
        return [*messages, Message(role="assistant", content=answer)], label, rejected

    def _completion(self, record: dict[str, Any], key: str) -> str:
        """A TRL completion: a string, or (conversational) a list holding one assistant message."""
        value = record.get(key)
        if isinstance(value, list):
            if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
                raise RecordError(key, f'field "{key}" must be one assistant message ([{{"role": "assistant", '
                                       '"content": ...}]) or a string')
            return apply_reasoning(_text(value[0], "content", f"{key}[0].content"), f"{key}[0].content", self.reasoning)
        return apply_reasoning(_answer_text(record, key), key, self.reasoning)

    def _ranked(self, record: dict[str, Any], spec: ShapeSpec) -> tuple[list[Message], str]:
        """A LLaMA-Factory ranking record: the prompt with the chosen answer, and the rejected answer's text."""
        for key in (spec.chosen, spec.rejected):
            if key not in record:
                raise RecordError(key, f'missing field "{key}" (ranking: true)')
        if spec.shape in ("sharegpt", "openai"):  # chosen and rejected are one turn each
            turns = record.get(spec.messages)
            turns = [*turns, record[spec.chosen]] if isinstance(turns, list) else turns
            messages = self._chat({**record, spec.messages: turns}, spec)
            turn = record[spec.rejected]
            if not isinstance(turn, dict):
                raise RecordError(spec.rejected, f'field "{spec.rejected}" must be a turn object, got '
                                                 f"{_json_type(turn)}")
            rejected = _text(turn, spec.content_tag, f"{spec.rejected}.{spec.content_tag}")
        else:
            messages = self._instruction({**record, spec.response: record[spec.chosen]}, spec)
            rejected = _answer_text(record, spec.rejected)
        return messages, apply_reasoning(rejected, spec.rejected, self.reasoning)

    def _instruction(self, record: dict[str, Any], spec: ShapeSpec) -> list[Message]:
        if spec.prompt not in record and spec.response not in record:
            raise RecordError("<record>", f"not a {spec.shape} record: no field \"{spec.prompt}\" (keys: "
                                          f"{_keys(record)})", kind="shape")
        prompt = _text(record, spec.prompt)
        extra = _optional_text(record, spec.query)
        if extra is not None and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        system = _optional_text(record, spec.system)
        field, reasoning = _reasoning_field(record, "")
        answer = apply_reasoning(_answer_text(record, spec.response), spec.response, self.reasoning, reasoning,
                                 field)
        return [
            *([Message(role="system", content=system)] if system is not None else []),
            *self._history(record, spec.history),
            Message(role="user", content=prompt),
            Message(role="assistant", content=answer),
        ]

    def _history(self, record: dict[str, Any], key: str | None) -> list[Message]:
        if key is None or record.get(key) in (None, []):
            return []
        turns = record[key]
        if not isinstance(turns, list):
            raise RecordError(key, f'field "{key}" must be a list of [prompt, answer] pairs, got {_json_type(turns)}')
        messages = []
        for i, pair in enumerate(turns):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
                raise RecordError(f"{key}[{i}]", f'field "{key}[{i}]" must be a [prompt, answer] pair of strings')
            answer = apply_reasoning(pair[1], f"{key}[{i}][1]", self.reasoning)
            messages += [Message(role="user", content=pair[0]), Message(role="assistant", content=answer)]
        return messages

    def _chat(self, record: dict[str, Any], spec: ShapeSpec) -> list[Message]:
        key = spec.messages
        if key not in record:
            raise RecordError("<record>", f'not a {spec.shape} record: no field "{key}" (keys: {_keys(record)})',
                              kind="shape")
        turns = record[key]
        if not isinstance(turns, list):
            raise RecordError(key, f'field "{key}" must be a list of turns, got {_json_type(turns)}')
        if not turns:
            raise RecordError(key, f'field "{key}" must not be empty')
        if spec.tools and record.get(spec.tools) not in (None, "", [], "[]"):
            raise RecordError(spec.tools, f'field "{spec.tools}": tool definitions are not supported yet; '
                                          "remove them or the row")
        roles = {spec.system_tag: "system", spec.user_tag: "user", spec.assistant_tag: "assistant"}
        messages = []
        for i, turn in enumerate(turns):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(where, f'field "{where}" must be an object, got {_json_type(turn)}')
            role = turn.get(spec.role_tag)
            field = f"{where}.{spec.role_tag}"
            if role in (spec.function_tag, spec.observation_tag) or turn.get("tool_calls"):
                raise RecordError(field, f"function-call turns ({json.dumps(role)}) are not supported yet "
                                         "(tools); remove the tool turns or the row")
            if not isinstance(role, str) or role not in roles:
                allowed = ", ".join(json.dumps(r) for r in roles)
                shown = "missing" if spec.role_tag not in turn else f"got {json.dumps(role, ensure_ascii=False)}"
                raise RecordError(field, f'field "{field}" must be one of {allowed}; {shown}')
            content = _text(turn, spec.content_tag, f"{where}.{spec.content_tag}")
            if roles[role] == "assistant":
                reasoning_field, reasoning = _reasoning_field(turn, where)
                content = apply_reasoning(content, f"{where}.{spec.content_tag}", self.reasoning, reasoning,
                                          reasoning_field)
            messages.append(Message(role=roles[role], content=content))
        system = _optional_text(record, spec.system)
        if system is not None and messages[0].role != "system":
            messages.insert(0, Message(role="system", content=system))
        return messages


def _label(record: dict[str, Any], key: str) -> bool:
    """A KTO label: a boolean (or 0/1, or true/false as text, as CSV cells carry it)."""
    value = record.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().casefold() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().casefold()]
    shown = "missing" if key not in record else f"got {json.dumps(value, ensure_ascii=False)}"
    raise RecordError(key, f'field "{key}" must be true (desirable) or false (undesirable); {shown}')


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(json.dumps(key, ensure_ascii=False) for key in record) or "none"


def _detect(record: dict[str, Any]) -> ShapeSpec:
    """The shape of one record from its keys; chat turns may use either from/value or role/content."""
    for key, shape in (("messages", "openai"), ("conversations", "sharegpt")):
        if key in record:
            turns = record[key]
            first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
            openai_turns = "role" in first if "from" in first or "role" in first else shape == "openai"
            return ShapeSpec(shape=shape, **{**(OPENAI_TAGS if openai_turns else {}), "messages": key})
    if "prompt" in record and any(key in record for key in ("completion", "chosen", "rejected")):
        return ShapeSpec(shape="trl")
    if "instruction" in record:
        return ShapeSpec.default("alpaca")
    if "input" in record or "output" in record:
        return ShapeSpec.default("pairs")
    raise RecordError("<record>", f"unknown shape: keys {_keys(record)}; expected {SHAPE_KEYS}", kind="shape")


def parse_record(record: dict[str, Any], shape: str = "auto", system_prompt: str | None = None,
                 reasoning: str = "keep") -> list[Message]:
    """Normalise one record to messages; `system_prompt` fills a missing system message."""
    spec = None if shape == "auto" else ShapeSpec.default(shape)
    return Normaliser(spec, system_prompt, reasoning).messages(record)


def example_id(messages: list[Message], label: bool | None = None, rejected: str | None = None) -> str:
    """Content hash of a conversation (and of its preference label or rejected answer): equal examples get
    equal ids wherever they come from."""
    parts = [m.model_dump() for m in messages]
    if label is not None or rejected is not None:  # an SFT example's id stays what it always was
        parts.append({"label": label, "rejected": rejected})
    canonical = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --- containers: each yields (number, raw text, parsed value or RecordError) per row -----------------


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


def _rows(source: DataSource) -> tuple[Unit, Iterator[RawRow]]:
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


# --- files ------------------------------------------------------------------------------------------------


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
    unit, rows = _rows(source)
    examples: list[Example] = []
    rejections: list[Rejection] = []
    kinds: Counter[str] = Counter()
    value_types: Counter[str] = Counter()
    for row in rows:
        try:
            if isinstance(row.value, RecordError):
                raise row.value
            if not isinstance(row.value, dict):
                value_types[_json_type(row.value)] += 1
                raise RecordError(f"<{unit}>", f"expected a JSON object, got {_json_type(row.value)}", kind="type")
            messages, label, rejected = normaliser.parts(row.value)
        except RecordError as exc:
            kinds[exc.kind] += 1
            rejections.append(Rejection(source=str(path), line=row.number, unit=unit, field=exc.field,
                                        reason=exc.message, raw=row.raw))
            continue
        examples.append(Example(id=example_id(messages, label, rejected), messages=messages, source=str(path),
                                line=row.number, unit=unit, label=label, rejected=rejected))
    if not examples:
        _raise_if_unusable(path, rejections, kinds, value_types)
    count = SourceCount(source=str(path), unit=unit, rows_read=len(examples) + len(rejections),
                        rows_rejected=len(rejections))
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
        keys = _keys(json.loads(rejections[0].raw))
        raise DataFileError(f"{path}: unknown shape (the first record has keys {keys}); expected {SHAPE_KEYS}, "
                            "or a LLaMA-Factory dataset_info.json that names the columns")
    if kinds["json"] == n:
        raise DataFileError(f"{path}: no line is valid JSON (first: {rejections[0].message})")


def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def resolve_sources(spec: Path, key: str, datasets: Iterable[str] = ()) -> list[DataSource]:
    """The files `data.train`/`data.validation`/`data.eval` name: a file, a folder (or LLaMA-Factory folder) or a glob."""
    if spec.is_dir():
        if (spec / DATASET_INFO).is_file():
            return _llama_factory_sources(spec / DATASET_INFO, list(datasets))
        files = sorted(p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in CONTAINERS
                       and not any(part.startswith(".") for part in p.relative_to(spec).parts))
        if not files:
            raise DataFileError(f"{key}: {spec}: no data files in the folder (expected {', '.join(CONTAINERS)})")
        return [DataSource(path=p) for p in files]
    if spec.is_file():
        if spec.suffix.lower() not in CONTAINERS:
            raise DataFileError(f"{key}: {spec}: unsupported file type {spec.suffix or '(none)'!r}; "
                                f"expected {', '.join(CONTAINERS)}")
        return [DataSource(path=spec)]
    if _has_glob(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in CONTAINERS)
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
        raise DataFileError(f"{info_path}: expected an object of datasets, got {_json_type(info)}")
    unknown = [name for name in names if name not in info]
    if unknown:
        raise DataFileError(f"{info_path}: no dataset named {', '.join(map(repr, unknown))} (data.datasets); "
                            f"it has {', '.join(map(repr, info))}")
    sources = []
    for name in names or list(info):
        entry = info[name]
        where = f"{info_path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise DataFileError(f"{where}: expected an object, got {_json_type(entry)}")
        if "file_name" not in entry:
            remote = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry), None)
            raise DataFileError(f"{where}: no file_name" + (f" ({remote}: tunepipe reads local files only; "
                                                             "download it and set file_name)" if remote else ""))
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


def _split_key(seed: int, id_: str) -> float:
    """A per-id number in [0, 1) fixed by the seed and the content, independent of file order."""
    return int(hashlib.sha256(f"{seed}:{id_}".encode()).hexdigest()[:16], 16) / 2**64


def split_side(unit: str, cfg: DataConfig) -> Side:
    """The split a question belongs to, from its stable key alone: below `eval_fraction` test, in the band of
    `validation_fraction` above it validation, else train. A band whose split is given as files
    (`data.eval`, `data.validation`) stays train. The key depends on the seed and the question only, so a
    question keeps its side on every run and every RAG snapshot: a test question is never trained on later."""
    band = split_band(unit, cfg)
    return band if band != "train" and held_out_files(cfg, band) is None else "train"


def split_band(unit: str, cfg: DataConfig) -> Side:
    """The split whose band of the key `unit` falls in, whether or not that split is taken from train."""
    key = _split_key(cfg.seed, unit)
    if key < cfg.eval_fraction:
        return "test"
    return "validation" if key < cfg.eval_fraction + cfg.validation_fraction else "train"


def held_out_files(cfg: DataConfig, split: HeldOutSplit) -> Path | None:
    """The files a held-out split is given as (`data.validation`, `data.eval` for test); None: taken from train."""
    return cfg.validation if split == "validation" else cfg.eval


def split_examples(examples: list[Example], cfg: DataConfig) -> dict[Side, list[Example]]:
    """Train, validation and test examples, each distinct conversation's side decided by its id alone.

    Deciding per id (not by position) keeps duplicates on one side and keeps an example's side fixed as
    the data grows, so a retrain never trains on what an earlier run held out. When chance leaves a split
    empty, the training id with the smallest key alone goes to it (and when it leaves training empty, the id
    with the largest key alone trains). A preference example is decided by its prompt, so every rated answer
    to a held-out question is held out with it (never trained on).
    """
    units = [_split_unit(example) for example in examples]
    keys = {unit: _split_key(cfg.seed, unit) for unit in units}
    sides = {unit: split_side(unit, cfg) for unit in keys}
    if len(sides) >= 2 and "train" not in sides.values():
        sides[max(keys, key=keys.__getitem__)] = "train"
    for split in ("test", "validation"):
        training = [unit for unit, side in sides.items() if side == "train"]
        if held_out_files(cfg, split) is None and split not in sides.values() and len(training) >= 2:
            sides[min(training, key=keys.__getitem__)] = split
    return {split: [example for example, unit in zip(examples, units) if sides[unit] == split]
            for split in ("train", "validation", "test")}


def _split_unit(example: Example) -> str:
    return example.id if example.kind == "sft" else prompt_unit(example.prompt)


def prompt_unit(prompt: list[Message]) -> str:
    """What a preference example's side of the split is decided by: its prompt."""
    return "prompt:" + example_id(prompt)


def data_sources(cfg: DataConfig) -> tuple[list[DataSource], list[DataSource], list[DataSource]]:
    """The train, validation and test (`data.eval`) files the config names; a split that is taken from train
    has none."""
    train = resolve_sources(cfg.train, "data.train", cfg.datasets)
    validation = [] if cfg.validation is None else resolve_sources(cfg.validation, "data.validation", cfg.datasets)
    test = [] if cfg.eval is None else resolve_sources(cfg.eval, "data.eval", cfg.datasets)
    return train, validation, test


def data_fingerprint(cfg: DataConfig) -> str:
    """Content hash of the configured data files, their shapes and the data section: the dataset's identity."""
    sources = [source for split in data_sources(cfg) for source in split]
    extra = json.dumps([cfg.model_dump(mode="json"), [s.model_dump(mode="json") for s in sources]])
    return fingerprint_files([s.path for s in sources], extra)


def read_sources(sources: list[DataSource], normaliser: Normaliser) -> list[FileRead]:
    """Read every file; the files that cannot be used are all named in one DataFileError."""
    reads, unusable = [], []
    for source in sources:
        try:
            reads.append(read_file(source, normaliser))
        except DataFileError as exc:
            unusable.append(str(exc))
    if unusable:
        raise DataFileError("\n".join(unusable))
    return reads


def data_normaliser(cfg: DataConfig) -> Normaliser:
    """How the configured data's records become messages: shape, system prompt and reasoning policy."""
    return Normaliser(None if cfg.shape == "auto" else ShapeSpec.default(cfg.shape), cfg.system_prompt,
                      cfg.reasoning)


def load_dataset(cfg: DataConfig, out_dir: Path) -> LoadedData:
    """Read the configured files, normalise them and write train, validation, eval (test) and quarantine JSONL
    under `out_dir`."""
    fingerprint = data_fingerprint(cfg)
    normaliser = data_normaliser(cfg)
    reads = [read_sources(sources, normaliser) for sources in data_sources(cfg)]
    train, validation, test = ([example for read in split for example in read.examples] for split in reads)
    if cfg.eval is None or cfg.validation is None:
        taken = split_examples(train, cfg)
        train, validation, test = taken["train"], validation + taken["validation"], test + taken["test"]
    rejections = [rejection for split in reads for read in split for rejection in read.rejections]

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "validation", "eval", "quarantine")}
    for name, rows in (("train", train), ("validation", validation), ("eval", test), ("quarantine", rejections)):
        write_jsonl(paths[name], rows)
    return LoadedData(
        train_path=paths["train"],
        validation_path=paths["validation"],
        eval_path=paths["eval"],
        quarantine_path=paths["quarantine"],
        n_train=len(train),
        n_validation=len(validation),
        n_eval=len(test),
        n_rejected=len(rejections),
        fingerprint=fingerprint,
        files=[read.count for split in reads for read in split],
    )


@task(name="load_data", cache_policy=STAGE_CACHE, persist_result=True)
def load_data(cfg: DataConfig, fingerprint: str, workdir: Path) -> LoadedData:
    # `fingerprint` is in the signature so the cache key changes with the files' bytes, not just their paths.
    return load_dataset(cfg, stage_dir(workdir, "load_data", fingerprint))
