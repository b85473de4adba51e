"""Which logged rows become examples: required fields, ratings (`rag.min_rating`, `rag.max_bad_rating`,
`rag.feedback_values`), the context placed as the app sends it, and duplicates of what is already there dropped.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Message
from tunepipe.tasks.data.files import FileRead, Rejection
from tunepipe.tasks.data.load import data_normaliser, data_sources, read_sources
from tunepipe.tasks.data.rag_logs import RagRow, jsonable
from tunepipe.tasks.data.shapes import RecordError, example_id, parse_record
from tunepipe.tasks.runtime.config import DataConfig, RagConfig


def _text_field(values: dict[str, Any], field: str, required: bool) -> str | None:
    value = values.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(field, "missing or empty")
        return None
    if isinstance(value, list) and field == "context" and all(isinstance(p, str) for p in value):
        return "\n\n".join(value)  # retrieved passages logged as a list
    if isinstance(value, dict | list) and field == "answer":
        return json.dumps(value, ensure_ascii=False)  # a JSON column holding the structured answer
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {type(value).__name__}")
    return value


def parse_rating(value: Any, feedback_values: dict[str, float]) -> float | None:
    """A number, a boolean, a numeric string or a feedback word as a rating; None when unrated."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str):
        words = {word.casefold(): rating for word, rating in feedback_values.items()}
        if value.strip().casefold() in words:
            return words[value.strip().casefold()]
        try:
            return float(value)
        except ValueError:
            pass
        raise RecordError(
            "rating", f"{value!r} is neither a number nor one of rag.feedback_values ({', '.join(feedback_values)})"
        )
    raise RecordError("rating", f"must be a number, boolean or feedback word, got {type(value).__name__}")


def rag_messages(
    question: str, context: str | None, answer: str, rag: RagConfig, system_prompt: str | None
) -> list[Message]:
    """The training conversation for one logged example, with the context placed as `rag.context_mode` says."""
    user = question
    system = system_prompt
    if context and rag.context_mode != "omit":
        block = rag.context_template.replace("{context}", context)
        if rag.context_mode == "user":
            user = f"{block}\n\n{question}"
        else:
            system = f"{system_prompt}\n\n{block}" if system_prompt else block
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return parse_record({"messages": messages}, system_prompt=system_prompt)


def seen_keys(data: DataConfig, rag: RagConfig, snapshot_rag: Path | None) -> tuple[set[str], set[str]]:
    """Dedupe keys of the base set (train, validation and test: a held-out question must never be trained on)
    and of every example ingested before; and those of the base's held-out sets alone."""
    if rag.dedupe == "off":
        return set(), set()
    train, validation, test = read_base(data)
    eval_keys = {
        _dedupe_key(example.messages[-2].content, example.messages, rag)
        for read in validation + test
        for example in read.examples
    }
    keys = eval_keys | {
        _dedupe_key(example.messages[-2].content, example.messages, rag) for read in train for example in read.examples
    }
    if snapshot_rag is not None:
        with snapshot_rag.open(encoding="utf-8") as lines:
            keys |= {json.loads(line)["rag"]["key"] for line in lines}
    return keys, eval_keys


def read_base(data: DataConfig) -> tuple[list[FileRead], list[FileRead], list[FileRead]]:
    """The base train, validation and test sets read as the finetune flow reads them: any container,
    normalised."""
    normaliser = data_normaliser(data)
    train, validation, test = (read_sources(sources, normaliser) for sources in data_sources(data))
    return train, validation, test


def base_lines(reads: list[FileRead]) -> list[dict[str, Any]]:
    """Snapshot lines of the base set: normalised messages, and the file and line or row each came from."""
    return [
        {
            "messages": [m.model_dump() for m in example.messages],
            "base": {"source": example.source, "line": example.line, "unit": example.unit},
        }
        for read in reads
        for example in read.examples
    ]


def _dedupe_key(question: str, messages: list[Message], rag: RagConfig) -> str:
    """The whole conversation's id, or the question as asked (whatever context was placed around it)."""
    return example_id(messages) if rag.dedupe == "conversation" else " ".join(question.split()).casefold()


class Selected(BaseModel):
    accepted: list[dict[str, Any]]  # {"messages": [...], "rag": {...provenance}} lines of rag.jsonl
    skipped: list[dict[str, Any]]  # {"source", "ref", "reason"}
    rejections: list[Rejection]


def _preference_label(rating: float | None, rag: RagConfig) -> bool | None:
    """True: a desirable answer, False: an undesirable one, None: not a preference row."""
    if rag.max_bad_rating is None or rating is None:
        return None
    if rating <= rag.max_bad_rating:
        return False
    return True if rag.min_rating is None or rating >= rag.min_rating else None


def select_rows(
    rows: list[RagRow], rag: RagConfig, data: DataConfig, seen: set[str], eval_keys: set[str] = frozenset()
) -> Selected:
    """Validate each row, apply the rating rules and dedupe; every row ends accepted, skipped or rejected."""
    accepted, skipped, rejections = [], [], []
    for row in rows:
        try:
            question = _text_field(row.values, "question", required=True)
            answer = _text_field(row.values, "answer", required=True)
            context = _text_field(row.values, "context", required=False)
            rating = parse_rating(row.values.get("rating"), rag.feedback_values)
            messages = rag_messages(question, context, answer, rag, data.system_prompt)
        except RecordError as exc:
            rejections.append(
                Rejection(
                    source=row.source,
                    line=row.line,
                    field=exc.field,
                    reason=f"row {row.ref}: {exc.message}",
                    raw=json.dumps(row.values, default=str, ensure_ascii=False),
                )
            )
            continue
        reason = None
        label = _preference_label(rating, rag)
        if rating is None and not rag.keep_unrated:
            reason = "unrated"
        elif label is None and rating is not None and rag.min_rating is not None and rating < rag.min_rating:
            reason = (
                "rating between max_bad_rating and min_rating"
                if rag.max_bad_rating is not None
                else "rating below min_rating"
            )
        key = _dedupe_key(question, messages, rag)
        if label is False:
            # Each distinct bad answer once; never one to a held-out question (that would train on it).
            if key in eval_keys:
                reason = reason or "question in the base validation or test set"
            key = f"{key}\x00bad\x00{' '.join(answer.split())}"
        if reason is None and rag.dedupe != "off" and key in seen:
            reason = f"duplicate {rag.dedupe}"
        if reason is not None:
            skipped.append({"source": row.source, "ref": row.ref, "reason": reason})
            continue
        seen.add(key)
        created_at = row.values.get("created_at")
        turns = [m.model_dump() for m in messages]
        # A rated row in TRL's unpaired format (KTO); SFT rows stay `messages` rows as before.
        example = (
            {"messages": turns} if label is None else {"prompt": turns[:-1], "completion": turns[-1:], "label": label}
        )
        accepted.append(
            {
                **example,
                "rag": {
                    "source": row.source,
                    "ref": row.ref,
                    "id": jsonable(row.values.get("id")),
                    "key": key,
                    "rating": rating,
                    "created_at": str(created_at) if created_at is not None else None,
                },
            }
        )
    return Selected(accepted=accepted, skipped=skipped, rejections=rejections)
