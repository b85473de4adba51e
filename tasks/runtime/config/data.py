"""`data:`: the training data, its splits and the checks it must pass."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunepipe.tasks.runtime.config.section import Section


class DataConfig(Section):
    train: Path = Field(
        description="Training data: a file (JSONL, JSON array, CSV or Parquet), a folder of such files, a glob "
        "(`data/*.jsonl`), or a LLaMA-Factory data folder described by its `dataset_info.json`."
    )
    eval: Path | None = Field(
        None,
        description="The test split, given like `train`: read only by the gate, the champion comparison, "
        "the report's headline and the served model's parity check; split from train when absent "
        "(`eval_fraction`).",
    )
    validation: Path | None = Field(
        None,
        description="The validation split, given like `train`: every choice before the gate reads it (best "
        "checkpoint, early stopping, the retrain loop's next attempt); split from train when absent "
        "(`validation_fraction`).",
    )
    shape: Literal["auto", "pairs", "alpaca", "sharegpt", "openai", "trl"] = Field(
        "auto",
        description="Record shape: `auto` detects it per record (`messages`: openai, `conversations`: sharegpt, "
        "`instruction`: alpaca, `input`/`output`: pairs, `prompt` with `completion` (and `label`: KTO) or "
        "`chosen`/`rejected` (DPO): trl); naming one quarantines records of any other shape.",
    )
    datasets: list[str] = Field(
        [], description="Entries of a LLaMA-Factory `dataset_info.json` to load; empty loads every entry."
    )
    eval_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Test share of the training rows when `eval` is not given: each question "
        "whose stable hash (of `seed` and the question) falls below it, the same on every run and snapshot.",
    )
    validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Validation share of the training rows when `validation` is not given: the "
        "questions whose hash falls in the band just above `eval_fraction`'s, so a question keeps its side (train, "
        "validation or test) for good as the data grows.",
    )
    system_prompt: str | None = Field(None, description="System message added to examples that have none.")
    reasoning: Literal["keep", "strip", "wrap"] = Field(
        "keep",
        description="Reasoning text, applied when rows are read so training, evaluation and serving see the "
        "same answers. `keep`: answers as written (a leading `<think>…</think>` block stays; a separate "
        "reasoning field is an error, since it would be lost). `strip`: drop `<think>` blocks and reasoning "
        "fields; the model learns to answer directly. `wrap`: write the reasoning (a reasoning field, or a "
        "`<think>` block already there) as one `<think>\\n…\\n</think>\\n\\n` block before the answer. It also "
        "sets the chat template's `enable_thinking` (off for strip, on for keep and wrap) in every stage: "
        "training, evaluation, parity and the Ollama TEMPLATE.",
    )
    output_format: Literal["json", "text"] = Field(
        "json", description="`json`: the assistant answer must be a JSON object (checked and scored as such)."
    )
    required_keys: list[str] = Field(
        [],
        description="Keys every JSON answer must carry (`output_format: json`); empty: the keys every "
        "training answer shares, required of the eval answers.",
    )
    on_invalid: Literal["quarantine", "fail"] = Field(
        "quarantine",
        description="A row that cannot be used: `quarantine` sets it aside (with file, line or row, field and "
        "reason) and goes on; `fail` stops the run before any model work.",
    )
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="More quarantined rows than this share of the rows read fails the run."
    )
    min_rows: int = Field(20, ge=1, description="Fewer valid training rows than this fails the data check.")
    max_chars: int = Field(20_000, ge=1, description="Longest allowed example (all messages), in characters.")
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.eval is None and self.validation is None and self.eval_fraction + self.validation_fraction >= 1:
            raise ValueError(
                f"data.eval_fraction {self.eval_fraction} + data.validation_fraction "
                f"{self.validation_fraction} leave no training rows: together they must stay below 1"
            )
        return self
