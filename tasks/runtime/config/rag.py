"""`rag:`: accumulated RAG Q&A that scheduled retraining folds into the training set."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_serializer, model_validator

from tunepipe.tasks.runtime.config.section import Section, masked


class RagColumns(Section):
    """Where each field of a logged RAG example lives: a column of the SQL table or a key of a JSONL record."""

    id: str = Field("id", description="Unique, increasing row id (the watermark when `watermark_on: id`).")
    question: str = Field("question", description="The user's question.")
    context: str | None = Field("context", description="Retrieved passages shown to the model; null: none logged.")
    answer: str = Field("answer", description="The answer given (the training target).")
    rating: str | None = Field(
        "rating", description="Rating or feedback: a number, a boolean, or a word from `feedback_values`; null: none."
    )
    created_at: str = Field("created_at", description="When the example was logged.")


class RagConfig(Section):
    """Accumulated RAG Q&A that the retrain flow folds into the training set, each row exactly once."""

    sql_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the log database, e.g. sqlite:///rag.db or "
        "postgresql+psycopg://user@host/db (the password from the environment, never in this file).",
    )
    _mask_url = field_serializer("sql_url", when_used="json")(lambda self, value: masked(value))
    table: str = Field("rag_examples", description="Table (or view) holding the logged examples.")
    jsonl_dir: Path | None = Field(
        None,
        description="Folder of JSONL drops (`*.jsonl`, one record per line, keys named as in `columns`). "
        "Files may grow; only complete lines are read, so write drops by appending whole lines.",
    )
    columns: RagColumns = RagColumns()
    watermark_on: Literal["id", "created_at"] = Field(
        "id",
        description="What the SQL watermark follows: rows with a larger id (or a later created_at, ties "
        "broken by id) than the last consumed one are new. It must grow in commit order.",
    )
    state_dir: Path | None = Field(
        None,
        description="Where the watermark and the dataset snapshots live; default `<workdir>/rag`. Keep it "
        "on persistent storage: it is what makes ingestion exactly-once.",
    )
    min_rating: float | None = Field(
        None,
        description="Drop rated examples below this rating; with `max_bad_rating`, the rows at or above "
        "it are the desirable (KTO) and chosen (DPO) answers.",
    )
    max_bad_rating: float | None = Field(
        None,
        description="Keep rows rated at or below this as undesirable answers (KTO; DPO's rejected answer "
        "where the question also has a good one) instead of dropping them; null: no preference rows. Some of "
        "the rated questions are held out (data.eval_fraction) so evaluation sees rated-bad answers it never "
        "trained on.",
    )
    keep_unrated: bool = Field(True, description="Keep examples without a rating (false: only rated ones).")
    feedback_values: dict[str, float] = Field(
        {"up": 1.0, "down": 0.0, "good": 1.0, "bad": 0.0, "positive": 1.0, "negative": 0.0},
        description="Feedback words (case-insensitive) and the rating each stands for.",
    )
    dedupe: Literal["question", "conversation", "off"] = Field(
        "question",
        description="Drop a new example whose question (`question`) or whole conversation "
        "(`conversation`) is already in the base set or was ingested before; the first one wins.",
    )
    context_mode: Literal["user", "system", "omit"] = Field(
        "user",
        description="Where retrieved context enters the prompt: before the question in the user turn, "
        "appended to the system prompt, or left out. Match what your RAG app sends at inference.",
    )
    context_template: str = Field(
        "Context:\n{context}", description="How the context block is written; `{context}` is replaced."
    )
    min_new_examples: int = Field(
        50,
        ge=1,
        description="Fewer new (not yet trained on) examples than this: the run ends as nothing to do.",
    )

    @model_validator(mode="after")
    def _bad_below_good(self) -> RagConfig:
        if None not in (self.min_rating, self.max_bad_rating) and self.max_bad_rating >= self.min_rating:
            raise ValueError(
                f"max_bad_rating ({self.max_bad_rating}) must be below min_rating ({self.min_rating}): "
                "a rating cannot be both good and bad"
            )
        return self
