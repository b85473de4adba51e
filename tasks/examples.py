"""The canonical example shape every stage after loading sees: OpenAI-style messages plus provenance."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Example(BaseModel):
    """One training conversation and where it came from (file and 1-based line), for error messages."""

    model_config = ConfigDict(extra="forbid")

    id: str
    messages: list[Message]
    source: str
    line: int

    @property
    def answer(self) -> str:
        """The final assistant message: what the model is trained and scored to produce."""
        return self.messages[-1].content

    @property
    def prompt(self) -> list[Message]:
        return self.messages[:-1]


def write_jsonl(path: Path, rows: Iterable[BaseModel]) -> int:
    """One JSON object per line (examples, rejections); the file is written even when there are none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(row.model_dump_json() + "\n")
            count += 1
    return count


def read_examples(path: Path) -> Iterator[Example]:
    """Read examples written by `write_jsonl` (already validated; not for user input)."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield Example.model_validate(json.loads(line))
