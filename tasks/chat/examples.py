"""The canonical example shape every stage after loading sees: OpenAI-style messages plus provenance."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

# Where a row sits in its file: a line number for JSONL, a 1-based record number for JSON arrays, CSV
# (data rows after the header) and Parquet.
Unit = Literal["line", "row"]

# A reasoning block as reasoning models write it (Qwen3, DeepSeek-R1), at the start of an answer. The opening
# tag may be missing from a model's reply: templates whose generation prompt opens the block (Qwen3.5, QwQ,
# DeepSeek-R1) have the model write only the reasoning and `</think>`. Training data must open it
# (`tunepipe.tasks.data.shapes.apply_reasoning` refuses a stray `</think>`).
THINK_BLOCK = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*", re.DOTALL)


def location(source: str, line: int, unit: Unit) -> str:
    """`data/train.jsonl:10` for lines, `data/alpaca.json row 2` for records: what error messages start with."""
    return f"{source}:{line}" if unit == "line" else f"{source} row {line}"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant text: the leading `<think>` block (or text up to a `</think>` whose
    opening the generation prompt wrote), if any, and what follows it.

    Scoring and serving read the answer part, so a model trained with `data.reasoning: keep` or `wrap` is
    judged on its answer, and one trained with `strip` is judged the same way if it still writes a block.
    """
    match = THINK_BLOCK.match(text)
    if match is None:
        return None, text
    return match.group(1).strip(), text[match.end() :]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str  # may be empty here: the data check quarantines empty turns, naming them


class Example(BaseModel):
    """One training conversation and where it came from (file and 1-based line or row), for error messages."""

    model_config = ConfigDict(extra="forbid")

    id: str
    messages: list[Message]
    source: str
    line: int
    unit: Unit = "line"
    # Preference data. KTO: whether the final answer is desirable (rated well) or undesirable (rated
    # badly); DPO: a rejected answer to the same prompt, the final message being the chosen one. Neither: an
    # SFT example.
    label: bool | None = None
    rejected: str | None = None

    @property
    def kind(self) -> Literal["sft", "desirable", "undesirable", "pair"]:
        if self.rejected is not None:
            return "pair"
        return "sft" if self.label is None else "desirable" if self.label else "undesirable"

    @property
    def where(self) -> str:
        return location(self.source, self.line, self.unit)

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
            yield Example.model_validate_json(line)  # parsed in pydantic's Rust core: several times faster
