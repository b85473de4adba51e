"""`gate:`: what a candidate must reach to be exported."""

from __future__ import annotations

from pydantic import Field, model_validator

from tunepipe.tasks.runtime.config.section import Section


class MetricRule(Section):
    """Limits on one metric of the candidate. Unset limits are not checked."""

    min: float | None = Field(None, description="The candidate's value must be at least this.")
    max: float | None = Field(None, description="The candidate's value must be at most this.")
    min_improvement_over_base: float | None = Field(
        None,
        description="The candidate must beat the base model by more than this, in the metric's better "
        "direction (for eval_loss, base loss minus candidate loss; for the others, candidate minus base): the lower "
        "end of the paired interval (`gate.confidence`) of the per-example differences must be above it.",
    )


class RetentionRule(Section):
    """The candidate must still find the base's answers to general prompts about as likely as the base does."""

    max_loss_increase: float = Field(
        0.5,
        ge=0,
        description="Largest rise allowed, in nats per token, of the candidate's mean token loss on the "
        "base's own greedy answers to the general prompts over the base's loss on them. A rise of d means the "
        "candidate finds what the base would say exp(d) times less likely per token (0.5: about 1.6 times).",
    )


class GateConfig(Section):
    """What a candidate must reach to be exported: rules on its metrics and, once a champion exists, on it."""

    rules: dict[str, MetricRule] = Field(
        default_factory=dict,
        description="Rules per metric name: eval_loss, stop_rate; JSON answers: valid_json_rate, exact_match, "
        "field_accuracy, field_accuracy.<key>, key_precision, key_recall, key_f1, required_keys_rate; "
        "text answers: exact_match, rouge_l, chrf; with eval.judge: judge_win_rate (pairwise) or judge_score (rubric).",
    )
    must_beat_champion_by: dict[str, float] = Field(
        default_factory=dict,
        description="When a champion exists, on each metric named here and on every metric that has a rule "
        "(margin 0 for those not named), the lower end of the paired interval (`gate.confidence`) of candidate "
        "minus champion, per test example, must be above the margin. A positive margin: better by more than it; "
        "0: shown better (a candidate no better than the champion keeps it serving); negative: not worse by that "
        "much. Better means higher, except for eval_loss (lower).",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Confidence of the intervals the base and champion rules decide on (two-"
        "sided: at 0.95 an equal candidate passes a margin-0 rule at most 2.5% of the time).",
    )
    max_regressions: int | float | None = Field(
        None,
        description="The most test examples that may regress against the champion (against the base before "
        "the first promotion): examples it matched exactly that the candidate does not, or JSON fields it had right "
        "that the candidate has wrong. A whole number is a count (0: none); a number between 0 and 1 a share of the "
        "test examples (0.02: 2%). null: regressions are listed, not gated.",
    )

    @model_validator(mode="after")
    def _regressions_are_a_count_or_a_share(self) -> GateConfig:
        allowed = self.max_regressions
        if isinstance(allowed, float) and not 0 < allowed < 1 or isinstance(allowed, int) and allowed < 0:
            raise ValueError(
                f"max_regressions: {allowed} is neither a count (a whole number, at least 0) nor a share "
                "of the test examples (a number between 0 and 1)"
            )
        return self

    retention: RetentionRule | None = Field(
        RetentionRule(),
        description="What the candidate may forget of the base's general ability (eval.retention's prompts); "
        "null: no rule.",
    )

    def champion_margins(self) -> dict[str, float]:
        return {**{metric: 0.0 for metric in self.rules}, **self.must_beat_champion_by}
