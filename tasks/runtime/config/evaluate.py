"""`eval:`: what evaluation measures (the metrics a rule may name, the judge, the general prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_serializer, model_validator

from tunepipe.tasks.runtime.config.section import Section, masked

# Metrics the evaluate stage reports (tasks/chat/metrics.py), by the name a gate rule uses. Checked when the config
# loads, so a typo fails before training, not after it.
JSON_METRICS = {
    "valid_json_rate",
    "exact_match",
    "field_accuracy",
    "key_precision",
    "key_recall",
    "key_f1",
    "required_keys_rate",
}
TEXT_METRICS = {"exact_match", "rouge_l", "chrf"}
COMMON_METRICS = {"eval_loss", "stop_rate"}
# Written by the judge (eval.judge), by its mode; only for the test report the gate reads.
JUDGE_METRICS = {"pairwise": "judge_win_rate", "rubric": "judge_score"}
LOWER_IS_BETTER = {"eval_loss", "retention_loss"}  # retention_loss: a model's loss on the base's general answers


# How a judge reads a rubric answer: the default rubric, G-Eval style (criteria, then what each score means).
DEFAULT_RUBRIC = (
    "Correctness and completeness against the reference answer, using only what the question and its context "
    "support.\n"
    "5: says everything the reference says that matters, with nothing wrong or invented.\n"
    "4: correct, but misses a minor point or adds an unneeded detail.\n"
    "3: partly correct: a main point is missing or unclear.\n"
    "2: mostly wrong or off the question, with a fragment of the right answer.\n"
    "1: wrong, invented, or no answer."
)


class JudgeConfig(Section):
    """A second model that judges the answers (prose, where word overlap misleads): pairwise against the
    champion (the base for a first model), asked in both orders, or each answer on a rubric."""

    model: str = Field(
        description="`ollama:NAME[:TAG]` (a model on the Ollama at `base_url`, default `ollama.host`), "
        "`openai:MODEL` (any OpenAI-compatible chat endpoint at `base_url`), or a `.gguf` file, which tunepipe "
        "serves with llama-cpp-python's own OpenAI-compatible server for the evaluation and stops after.",
    )
    base_url: str | None = Field(
        None,
        description="Ollama: its URL (default: `ollama.host`, $OLLAMA_HOST, http://127.0.0.1:11434). "
        "openai: the API's base URL ending in /v1, e.g. http://gpu-box:8000/v1 (required).",
    )
    _mask_base_url = field_serializer("base_url", when_used="json")(lambda self, value: masked(value))
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the endpoint's API key, sent as a bearer "
        "token; the key itself is never in the config, the logs or the judge's records.",
    )
    mode: Literal["pairwise", "rubric"] = Field(
        "pairwise",
        description="`pairwise`: the candidate's answer against the champion's (the base's for a "
        "first model), in both orders; a verdict that flips with the order is a tie. Metric `judge_win_rate` "
        "(win 1, tie 0.5, loss 0). `rubric`: each of the two answers scored 1-5 against the reference by "
        "`rubric`; metric `judge_score`, the score mapped to [0, 1] ((score - 1) / 4).",
    )
    rubric: str = Field(DEFAULT_RUBRIC, description="Rubric mode: what the judge scores and what each score means.")
    structured: bool = Field(
        False,
        description="Constrain the judge's reply to a JSON verdict (Ollama's `format`, the endpoint's "
        "`response_format` JSON schema): no room for an explanation, but a small judge always answers in the "
        "format. Off: the judge explains, then gives its verdict as [[A]] / [[B]] / [[C]] (or [[1]]-[[5]]).",
    )
    max_tokens: int = Field(512, ge=1, description="Longest reply of the judge, explanation included.")
    timeout_s: float = Field(300, gt=0, description="How long one judge call may take.")
    context_length: int = Field(
        4096,
        ge=256,
        description="A `.gguf` judge: the context its server is started with (prompt and reply).",
    )
    max_unparsed: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Largest share of judge calls whose verdict cannot be read even after the "
        "format was restated once; more, and the judge's metrics count as not measured: the run fails naming "
        "the gate rules that could not be measured.",
    )

    max_order_flips: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Pairwise: largest share of examples (of those with both verdicts read) whose "
        "verdict changes with the order of the answers; more, and the judge is judging positions, not answers: its "
        "metric counts as not measured and the run fails naming the gate rules that could not be measured.",
    )

    @model_validator(mode="before")
    @classmethod
    def _model_only(cls, raw: Any) -> Any:
        """`eval.judge: ollama:qwen2.5:7b` names the model and keeps every default."""
        return {"model": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _known_kind(self) -> JudgeConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai: judge needs base_url (the API's base URL, ending in /v1)")
        if self.kind == "gguf" and self.base_url:
            raise ValueError("a .gguf judge is served by tunepipe itself: base_url does not apply")
        return self

    @property
    def kind(self) -> Literal["ollama", "openai", "gguf"]:
        if self.model.startswith("ollama:"):
            return "ollama"
        if self.model.startswith("openai:"):
            return "openai"
        if self.model.endswith(".gguf"):
            return "gguf"
        raise ValueError(f"judge model {self.model!r}: expected ollama:NAME, openai:MODEL or a .gguf file")

    @property
    def metric(self) -> str:
        """The metric this judge writes."""
        return JUDGE_METRICS[self.mode]


class RetentionConfig(Section):
    """General prompts outside the task, to measure what fine-tuning made the model forget: the base answers them
    greedily, and the candidate's loss on those answers is set against the base's own (tasks/evaluate/retention.py)."""

    builtin: int = Field(
        16,
        ge=0,
        description="How many of the built-in general prompts to ask, in their order, which changes language "
        "from one to the next (English, French, German, Spanish, Chinese, ...: general chat, instructions, a little "
        "arithmetic and knowledge); 0: none.",
    )
    prompts: Path | None = Field(
        None,
        description="Your own general prompts, asked after the built-in ones: JSONL, one per line, "
        '`{"prompt": "..."}` or `{"messages": [...]}` ending with a user turn (an `id` and a `language` may be given).',
    )
    max_new_tokens: int = Field(
        64,
        ge=1,
        description="Longest answer the base and the candidate give to a general prompt.",
    )

    @model_validator(mode="after")
    def _prompts_readable(self) -> RetentionConfig:
        # A bad prompts file fails when the config loads, before any training, naming its file and line.
        from tunepipe.tasks.chat.general_prompts import read_prompts

        read_prompts(self)
        return self


class EvalConfig(Section):
    # Retention is a stage of its own, and the judge reads the answers the evaluation wrote: changing either
    # never generates them again.
    cache_exclude: ClassVar[set[str]] = {"retention", "judge"}

    max_samples: int = Field(
        64, ge=1, description="Examples of each split (validation, test) used for generation metrics."
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest answer generated; one cut here has not stopped.")
    batch_size: int = Field(
        16, ge=1, description="Prompts answered at once (and rows per eval-loss batch); on a GPU 64-128 is fastest."
    )
    probes: list[str] = Field(
        [],
        description="Fixed user prompts (the data's system prompt is added) answered by base, champion and "
        "candidate side by side, written to the evaluation's probes.jsonl.",
    )
    retention: RetentionConfig = Field(
        RetentionConfig(),
        description="General prompts outside the task, answered by base and candidate: what "
        "the candidate forgot (gate.retention decides on it).",
    )
    judge: JudgeConfig | None = Field(
        None,
        description="A second model that judges the test answers (`ollama:NAME`, `openai:MODEL` with "
        "base_url, or a .gguf file; a string sets only the model); its metric (`judge_win_rate` or `judge_score`) "
        "can then be gated like any other. null: no judge.",
    )
