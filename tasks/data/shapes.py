"""Record shapes (pairs, alpaca, sharegpt, openai, trl; LLaMA-Factory's columns and tags): which keys of a
record hold what, and how one record becomes messages, or a `RecordError` naming the field and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tunepipe.tasks.chat.examples import Message, split_reasoning

REASONING_FIELDS = ("reasoning_content", "reasoning")  # OpenAI-compatible APIs and most R1-style exports


Shape = Literal["pairs", "alpaca", "sharegpt", "openai", "trl"]


SHAPE_KEYS = (
    "'messages' (openai), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), "
    "'input' + 'output' (pairs) or 'prompt' + 'completion' / 'chosen' + 'rejected' (trl)"
)


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}  # CSV cells carry booleans as text


class RecordError(ValueError):
    """One record that cannot be used; `field` is a path into it such as `messages[2].role`.

    `kind` groups errors that, when every row of a file has them, mean the file itself is unusable.
    """

    def __init__(self, field: str, message: str, kind: str = "record") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.kind = kind


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


OPENAI_TAGS = dict(
    messages="messages",
    role_tag="role",
    content_tag="content",
    user_tag="user",
    assistant_tag="assistant",
    observation_tag="tool",
    function_tag="function",
)


def json_type(value: object) -> str:
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
        raise RecordError(field, f'field "{field}" must be a string, got {json_type(value)}')
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
        raise RecordError(key, f'field "{key}" must be a string or a JSON object, got {json_type(record[key])}')
    return _text(record, key)


def _reasoning_field(obj: dict[str, Any], where: str) -> tuple[str, str | None]:
    for key in REASONING_FIELDS:
        if obj.get(key) not in (None, ""):
            field = f"{where}.{key}" if where else key
            return field, _text(obj, key, field)
    return "", None


def apply_reasoning(answer: str, answer_field: str, policy: str, reasoning: str | None = None, field: str = "") -> str:
    """The assistant text under `data.reasoning` (see DataConfig.reasoning), from the answer in `answer_field`
    and a reasoning field `field`, if any."""
    inline, rest = split_reasoning(answer)
    if inline is not None and not answer.lstrip().startswith("<think>"):
        # Evaluation would take the text before it for reasoning, and strip would drop it.
        raise RecordError(
            answer_field,
            f'field "{answer_field}" has a </think> with no <think> before it, so the '
            "text before it would be taken for reasoning and not trained as the answer; "
            "open the block with <think> or remove the stray </think>",
        )
    if policy == "strip":
        return rest
    if reasoning is not None:
        if policy == "keep":
            raise RecordError(
                field,
                f'field "{field}" would be lost with data.reasoning: keep; set data.reasoning '
                "to wrap (train on it) or strip (drop it)",
            )
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
                raise RecordError(
                    key,
                    f'field "{key}" must be one assistant message ([{{"role": "assistant", '
                    '"content": ...}]) or a string',
                )
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
                raise RecordError(
                    spec.rejected, f'field "{spec.rejected}" must be a turn object, got {json_type(turn)}'
                )
            rejected = _text(turn, spec.content_tag, f"{spec.rejected}.{spec.content_tag}")
        else:
            messages = self._instruction({**record, spec.response: record[spec.chosen]}, spec)
            rejected = _answer_text(record, spec.rejected)
        return messages, apply_reasoning(rejected, spec.rejected, self.reasoning)

    def _instruction(self, record: dict[str, Any], spec: ShapeSpec) -> list[Message]:
        if spec.prompt not in record and spec.response not in record:
            raise RecordError(
                "<record>",
                f'not a {spec.shape} record: no field "{spec.prompt}" (keys: {record_keys(record)})',
                kind="shape",
            )
        prompt = _text(record, spec.prompt)
        extra = _optional_text(record, spec.query)
        if extra is not None and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        system = _optional_text(record, spec.system)
        field, reasoning = _reasoning_field(record, "")
        answer = apply_reasoning(_answer_text(record, spec.response), spec.response, self.reasoning, reasoning, field)
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
            raise RecordError(key, f'field "{key}" must be a list of [prompt, answer] pairs, got {json_type(turns)}')
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
            raise RecordError(
                "<record>", f'not a {spec.shape} record: no field "{key}" (keys: {record_keys(record)})', kind="shape"
            )
        turns = record[key]
        if not isinstance(turns, list):
            raise RecordError(key, f'field "{key}" must be a list of turns, got {json_type(turns)}')
        if not turns:
            raise RecordError(key, f'field "{key}" must not be empty')
        if spec.tools and record.get(spec.tools) not in (None, "", [], "[]"):
            raise RecordError(
                spec.tools, f'field "{spec.tools}": tool definitions are not supported yet; remove them or the row'
            )
        roles = {spec.system_tag: "system", spec.user_tag: "user", spec.assistant_tag: "assistant"}
        messages = []
        for i, turn in enumerate(turns):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(where, f'field "{where}" must be an object, got {json_type(turn)}')
            role = turn.get(spec.role_tag)
            field = f"{where}.{spec.role_tag}"
            if role in (spec.function_tag, spec.observation_tag) or turn.get("tool_calls"):
                raise RecordError(
                    field,
                    f"function-call turns ({json.dumps(role)}) are not supported yet "
                    "(tools); remove the tool turns or the row",
                )
            if not isinstance(role, str) or role not in roles:
                allowed = ", ".join(json.dumps(r) for r in roles)
                shown = "missing" if spec.role_tag not in turn else f"got {json.dumps(role, ensure_ascii=False)}"
                raise RecordError(field, f'field "{field}" must be one of {allowed}; {shown}')
            content = _text(turn, spec.content_tag, f"{where}.{spec.content_tag}")
            if roles[role] == "assistant":
                reasoning_field, reasoning = _reasoning_field(turn, where)
                content = apply_reasoning(
                    content, f"{where}.{spec.content_tag}", self.reasoning, reasoning, reasoning_field
                )
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


def record_keys(record: dict[str, Any]) -> str:
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
    raise RecordError("<record>", f"unknown shape: keys {record_keys(record)}; expected {SHAPE_KEYS}", kind="shape")


def parse_record(
    record: dict[str, Any], shape: str = "auto", system_prompt: str | None = None, reasoning: str = "keep"
) -> list[Message]:
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
