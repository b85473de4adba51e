"""What the data stages hand on: loaded files, the checked splits, the formatted token rows.

Plain models that import no stage, so every later stage (and the MLflow writer) can read them without
pulling in the stages that made them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Unit
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.runtime.caching import file_digest
from tunepipe.tasks.runtime.records import DatasetRecord, Record

# The three splits: training rows; validation, which every choice before the gate reads (best checkpoint, early
# stop, another attempt); test (`data.eval`, called `eval` in the stages' results), which only the gate, the
# champion comparison, the report's headline and parity read.
Side = Literal["train", "validation", "test"]
HeldOutSplit = Literal["validation", "test"]


class SourceCount(BaseModel):
    source: str
    unit: Unit
    rows_read: int
    rows_rejected: int  # at load; the data check and formatting may set more aside


class LoadedData(BaseModel):
    train_path: Path
    validation_path: Path
    eval_path: Path  # the test split
    quarantine_path: Path
    n_train: int
    n_validation: int
    n_eval: int
    n_rejected: int
    fingerprint: str
    files: list[SourceCount]

    def record(self) -> Record:
        return Record(
            metrics={
                "data.rows_loaded_train": self.n_train,
                "data.rows_loaded_eval": self.n_eval,
                "data.rows_loaded_validation": self.n_validation,
                "data.rows_rejected_at_load": self.n_rejected,
            }
        )


class TokenizedSplits(BaseModel):
    """Token ids of the train, validation and eval (test) examples files, made by the data check as it
    measured lengths.

    Line i of each file holds example i of its examples file: {"id", "pieces": [[token ids, trained], ...]}.
    `format_dataset` reads them instead of tokenizing the examples a second time.
    """

    train: Path
    validation: Path
    eval: Path
    tokenizer: str  # `tokenizer_key` of the tokenizer, chat template and chat context that made them
    chat: ChatContext  # what the chat template rendered them with (data.reasoning, the date)


class DataCheckReport(BaseModel):
    """One split after the check."""

    success: bool  # every expectation passed on every row (nothing set aside by the check)
    n_checked: int
    n_passed: int
    n_quarantined: int
    expectations: list[dict[str, Any]]
    clean_path: Path  # the rows that passed, but the rated-bad (undesirable) ones
    # Rated-bad answers that passed (KTO rows with label false): trained away from, never towards, and on the
    # eval side scored as answers the candidate should no longer give.
    undesirable_path: Path | None = None
    n_undesirable: int = 0


class FileAccount(BaseModel):
    """Where the rows of one input file went: kept_train + kept_validation + kept_eval + quarantined == rows_read."""

    source: str
    unit: Unit
    rows_read: int
    kept_train: int
    kept_validation: int
    kept_eval: int  # the test split's
    quarantined: int


class CheckedData(BaseModel):
    train: DataCheckReport
    validation: DataCheckReport
    eval: DataCheckReport  # the test split
    files: list[FileAccount]
    rows_read: int
    rows_quarantined: int  # at load and by the check
    quarantine_path: Path  # every row set aside, with source, line or row, field and reason
    data_docs: Path  # Great Expectations' Data Docs: index.html
    summary_path: Path  # machine-readable summary (JSON)
    tokens: TokenizedSplits  # token ids of the clean examples, which the format stage reads
    problems: list[str]  # why the run may not go on; empty when it may
    first_rejections: list[str]  # messages of the first set-aside rows, for the console
    fingerprint: str  # of the whole data set checked (LoadedData.fingerprint)

    def record(self) -> Record:
        """Row counts, the quarantine and the Data Docs; and the rows the run trains and is judged on, as
        MLflow dataset inputs ("Datasets" in the UI): each split's own digest, the data set's fingerprint (the
        `dataset.fingerprint` tag) in its profile."""
        splits = (
            ("train", self.train, "training"),
            ("validation", self.validation, "validation"),
            ("eval", self.eval, "evaluation"),
        )
        return Record(
            metrics={
                **{f"data.rows_quarantined_{split}": report.n_quarantined for split, report, _ in splits},
                **{f"data.rows_clean_{split}": report.n_passed for split, report, _ in splits},
                "data.rows_read": self.rows_read,
                "data.rows_quarantined": self.rows_quarantined,
            },
            files=[
                (self.quarantine_path, "quarantine"),
                (self.summary_path, "data_checks"),
                (self.data_docs.parent, "data_checks/data_docs"),
            ],
            tags={"data.checks": "passed" if not self.problems else "failed"},
            datasets=[
                DatasetRecord(
                    name=split,
                    digest=file_digest(report.clean_path).removeprefix("sha256:"),
                    path=report.clean_path,
                    context=context,
                    profile={
                        "num_rows": report.n_passed,
                        "fingerprint": self.fingerprint,
                        "rows_by_file": {f.source: getattr(f, f"kept_{split}") for f in self.files},
                    },
                )
                for split, report, context in splits
            ],
        )

    def held_out(self, split: HeldOutSplit) -> DataCheckReport:
        return self.validation if split == "validation" else self.eval


class FormattedSplit(BaseModel):
    path: Path  # JSONL rows: {"id", "input_ids", "labels"}; preference rows also "kind" (and a DPO row's rejected)
    n_rows: int
    n_tokens: int
    n_trained_tokens: int
    max_tokens: int

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


class FormattedData(BaseModel):
    train: FormattedSplit
    validation: FormattedSplit | None = None  # None only where no validation examples were given to format
    eval: FormattedSplit  # the test split
    eval_undesirable: FormattedSplit | None = None  # held-out rated-bad answers, when the data has any
    validation_undesirable: FormattedSplit | None = None
    quarantine_path: Path  # examples longer than model.max_seq_length
    n_quarantined: int
    chat: ChatContext  # what training's texts were rendered with: evaluation, parity and serving render so too

    def record(self) -> Record:
        return Record(
            metrics={
                "format.train_tokens": self.train.n_tokens,
                "format.train_trained_tokens": self.train.n_trained_tokens,
                "format.rows_too_long": self.n_quarantined,
            },
            files=[(self.quarantine_path, "quarantine")],
        )

    def held_out(self, split: HeldOutSplit) -> tuple[FormattedSplit, FormattedSplit | None]:
        """A held-out split's formatted rows (its loss), and its rated-bad answers' if it has any."""
        if split == "validation":
            return self.validation, self.validation_undesirable
        return self.eval, self.eval_undesirable
