"""Load user data in any supported format and normalise it to canonical `Example`s.

Supported record shapes (one JSON object per line):
  plain pairs  {"input": str, "output": str | object | array, "system"?: str}
  alpaca       {"instruction": str, "input"?: str, "output": str | object | array, "system"?: str}
  sharegpt     {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}
  OpenAI       {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Nothing is dropped silently: every line that cannot be used becomes a `Rejection` naming the file, the
line, the field and the problem, with the original text kept, and is written to a quarantine file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import DataConfig
from tasks.examples import Example, Message, write_jsonl

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
OPENAI_ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """One record that cannot be used; `field` is a path into it such as `messages[2].role`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Rejection(BaseModel):
    """A row that was not used, with the original text so that nothing is lost."""

    source: str
    line: int
    field: str
    reason: str
    raw: str


class LoadedData(BaseModel):
    train_path: Path
    eval_path: Path
    quarantine_path: Path
    n_train: int
    n_eval: int
    n_rejected: int
    fingerprint: str


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text(record: dict[str, Any], key: str, field: str | None = None) -> str:
    """`record[key]` as a non-empty string, or a RecordError naming `field` (default: `key`)."""
    field = field or key
    if key not in record:
        raise RecordError(field, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RecordError(field, "must not be empty")
    return value


def _output_text(record: dict[str, Any]) -> str:
    """The answer of a pairs/alpaca record: a string as is, a JSON object or array serialised compactly."""
    if "output" not in record:
        raise RecordError("output", "missing")
    output = record["output"]
    if isinstance(output, (dict, list)):
        if not output:
            raise RecordError("output", "must not be empty")
        return json.dumps(output, ensure_ascii=False)
    return _text(record, "output")


def _optional_system(record: dict[str, Any]) -> list[Message]:
    # Alpaca-style exports often carry `"system": ""` to mean "no system prompt", so empty counts as absent.
    if record.get("system") in (None, ""):
        return []
    return [Message(role="system", content=_text(record, "system"))]


def _turns(record: dict[str, Any], key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    """Messages from a list of turn objects, checking every role against `roles` (given name → canonical)."""
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(key, f"must be a list of turns, got {_json_type(turns)}")
    if not turns:
        raise RecordError(key, "must not be empty")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"must be an object, got {_json_type(turn)}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            allowed = ", ".join(repr(r) for r in roles)
            shown = "missing" if role_key not in turn else f"got {json.dumps(role, ensure_ascii=False)}"
            raise RecordError(f"{where}.{role_key}", f"must be one of {allowed}; {shown}")
        messages.append(Message(role=roles[role], content=_text(turn, content_key, f"{where}.{content_key}")))
    _check_order(messages, key, role_key)
    return messages


def _check_order(messages: list[Message], key: str, role_key: str) -> None:
    """Optional system first, then user/assistant alternating, ending with the assistant's answer."""
    start = 1 if messages[0].role == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message.role != expected:
            where = "a system message is only allowed first" if message.role == "system" else "roles must alternate"
            raise RecordError(f"{key}[{i}].{role_key}", f"expected {expected!r}, got {message.role!r} ({where})")
    if messages[-1].role != "assistant":
        raise RecordError(
            f"{key}[{len(messages) - 1}].{role_key}",
            f"the last message must be the assistant's answer, got {messages[-1].role!r}",
        )


def parse_record(record: dict[str, Any], system_prompt: str | None) -> list[Message]:
    """Normalise one record of any supported format to messages; `system_prompt` fills a missing system."""
    if "messages" in record:
        messages = _turns(record, "messages", "role", "content", {r: r for r in OPENAI_ROLES})
    elif "conversations" in record:
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in record:
        instruction = _text(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError("input", f"must be a string, got {_json_type(extra)}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [
            *_optional_system(record),
            Message(role="user", content=prompt),
            Message(role="assistant", content=_output_text(record)),
        ]
    elif "input" in record or "output" in record:
        messages = [
            *_optional_system(record),
            Message(role="user", content=_text(record, "input")),
            Message(role="assistant", content=_output_text(record)),
        ]
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise RecordError(
            "<record>",
            f"unrecognised format (keys: {keys}); expected 'input'/'output', 'instruction'/'output', "
            "'conversations' or 'messages'",
        )
    if system_prompt and messages[0].role != "system":
        messages.insert(0, Message(role="system", content=system_prompt))
    return messages


def example_id(messages: list[Message]) -> str:
    """Content hash of a conversation: equal conversations get equal ids wherever they come from."""
    canonical = json.dumps([m.model_dump() for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN/Infinity, which are not JSON and would make invalid answers downstream.
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(raw_bytes: bytes, system_prompt: str | None) -> list[Message]:
    try:
        record = json.loads(raw_bytes.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise RecordError("<line>", f"not valid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise RecordError("<line>", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        raise RecordError("<line>", f"invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise RecordError("<line>", f"expected a JSON object, got {_json_type(record)}")
    return parse_record(record, system_prompt)


def read_jsonl(path: Path, system_prompt: str | None) -> tuple[list[Example], list[Rejection]]:
    """Parse a JSONL file of records; lines are 1-based, blank lines are skipped, bad lines are rejected."""
    examples: list[Example] = []
    rejections: list[Rejection] = []
    # Bytes, split on "\n" only, so line numbers match an editor's and one badly encoded line costs one row.
    for number, raw_bytes in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw_bytes = raw_bytes.removesuffix(b"\r")
        if number == 1:
            raw_bytes = raw_bytes.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        raw = raw_bytes.decode("utf-8", "backslashreplace")
        if not raw.strip():
            continue
        try:
            messages = _parse_line(raw_bytes, system_prompt)
        except RecordError as exc:
            rejections.append(Rejection(source=str(path), line=number, field=exc.field, reason=exc.message, raw=raw))
            continue
        examples.append(Example(id=example_id(messages), messages=messages, source=str(path), line=number))
    return examples, rejections


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


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out each distinct conversation with probability `eval_fraction`, decided by its id alone.

    Deciding per id (not by position) keeps duplicates on one side and keeps an example's side fixed as
    the data grows, so a retrain never trains on what an earlier run held out. When chance leaves one
    side empty, the id with the smallest key alone is held out.
    """
    keys = {example.id: _split_key(seed, example.id) for example in examples}
    held_out = {id_ for id_, key in keys.items() if key < eval_fraction}
    if len(keys) >= 2 and (not held_out or held_out == keys.keys()):
        held_out = {min(keys, key=keys.__getitem__)}
    train = [example for example in examples if example.id not in held_out]
    eval_ = [example for example in examples if example.id in held_out]
    return train, eval_


def _require_file(path: Path, key: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{key}: file not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{key}: not a file: {path}")


def data_fingerprint(cfg: DataConfig) -> str:
    """Content hash of the configured data files and the data section: the dataset's identity."""
    _require_file(cfg.train, "data.train")
    if cfg.eval is not None:
        _require_file(cfg.eval, "data.eval")
    inputs = [cfg.train] if cfg.eval is None else [cfg.train, cfg.eval]
    return fingerprint_files(inputs, cfg.model_dump_json())


def load_dataset(cfg: DataConfig, out_dir: Path) -> LoadedData:
    """Read the configured files, normalise them and write train, eval and quarantine JSONL under `out_dir`."""
    fingerprint = data_fingerprint(cfg)

    train, rejections = read_jsonl(cfg.train, cfg.system_prompt)
    if cfg.eval is not None:
        eval_, eval_rejections = read_jsonl(cfg.eval, cfg.system_prompt)
        rejections += eval_rejections
    else:
        train, eval_ = split_examples(train, cfg.eval_fraction, cfg.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path, quarantine_path = (out_dir / f"{name}.jsonl" for name in ("train", "eval", "quarantine"))
    write_jsonl(train_path, train)
    write_jsonl(eval_path, eval_)
    write_jsonl(quarantine_path, rejections)
    return LoadedData(
        train_path=train_path,
        eval_path=eval_path,
        quarantine_path=quarantine_path,
        n_train=len(train),
        n_eval=len(eval_),
        n_rejected=len(rejections),
        fingerprint=fingerprint,
    )


@task(name="load_data", cache_policy=STAGE_CACHE, persist_result=True)
def load_data(cfg: DataConfig, fingerprint: str, workdir: Path) -> LoadedData:
    # `fingerprint` is in the signature so the cache key changes with the files' bytes, not just their paths.
    return load_dataset(cfg, stage_dir(workdir, "load_data", fingerprint))
