"""The evaluation gate: every kind of rule at its boundary, the champion margin, one reason per failing rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.evaluate.gate import decide
from tasks.evaluate.results import EvalReport, GateDecision, ModelScores
from tasks.runtime.config import ConfigError, GateConfig, MetricRule, load_config

# Values exactly representable in binary floating point, so "at the boundary" means equal, not close.
CANDIDATE = {"eval_loss": 2.5, "valid_json_rate": 0.75, "exact_match": 0.5, "field_accuracy": 0.625,
             "field_accuracy.price": 0.5, "stop_rate": 1.0}
BASE = {"eval_loss": 3.0, "valid_json_rate": 0.25, "exact_match": 0.0, "field_accuracy": 0.125,
        "field_accuracy.price": 0.0, "stop_rate": 0.5}


def _report(candidate: dict = CANDIDATE, champion: dict | None = None) -> EvalReport:
    return EvalReport(
        n_samples=8, candidate=ModelScores(name="candidate", metrics=candidate),
        base=ModelScores(name="base", metrics=BASE),
        champion=None if champion is None else ModelScores(name="champion", version="3", metrics=champion),
        samples_path=Path("samples.jsonl"), probes_path=Path("probes.jsonl"),
    )


def _gate(**rules: dict) -> GateConfig:
    return GateConfig(rules={metric.replace("__", "."): MetricRule(**rule) for metric, rule in rules.items()})


def _verdicts(decision: GateDecision) -> dict[tuple[str, str], bool]:
    return {(check.metric, check.kind): check.passed for check in decision.checks}


@pytest.mark.parametrize(
    ("metric", "rule", "passing", "failing"),
    [
        ("valid_json_rate", "min", 0.75, 0.8125),  # candidate 0.75
        ("field_accuracy__price", "min", 0.5, 0.5625),  # a per-field accuracy, candidate 0.5
        ("eval_loss", "max", 2.5, 2.4375),  # candidate 2.5
        ("eval_loss", "min_improvement_over_base", 0.5, 0.5625),  # 3.0 - 2.5: lower is better
        ("field_accuracy", "min_improvement_over_base", 0.5, 0.5625),  # 0.625 - 0.125: higher is better
    ],
)
def test_each_rule_passes_at_its_boundary_and_fails_past_it(metric: str, rule: str, passing: float, failing: float):
    kind = "over_base" if rule == "min_improvement_over_base" else rule
    at_limit = decide(_report(), _gate(**{metric: {rule: passing}}))
    assert _verdicts(at_limit) == {(metric.replace("__", "."), kind): True}
    assert at_limit.passed and at_limit.reasons == []

    past_limit = decide(_report(), _gate(**{metric: {rule: failing}}))
    assert _verdicts(past_limit) == {(metric.replace("__", "."), kind): False}
    assert not past_limit.passed
    assert past_limit.checks[0].limit == failing
    assert len(past_limit.reasons) == 1


def test_reasons_say_what_failed_in_words():
    decision = decide(_report(), _gate(
        valid_json_rate={"min": 0.9}, eval_loss={"max": 2.0, "min_improvement_over_base": 1.0},
        exact_match={"min": 0.25},
    ))
    assert decision.reasons == [
        "valid_json_rate is 0.75, below the minimum 0.9",
        "eval_loss is 2.5, above the maximum 2",
        "eval_loss is 2.5 against base's 3: 0.5 better, short of the required 1 lower",
    ]
    assert decision.summary().startswith("failed 3 of 4 rules: valid_json_rate is 0.75")


def test_no_rules_passes():
    decision = decide(_report(), GateConfig())
    assert decision.passed and decision.checks == []
    assert decision.summary() == "passed (no rules configured)"


def test_unmeasured_metric_fails_its_rule_and_says_so():
    decision = decide(_report(), _gate(rouge_l={"min": 0.0}))
    assert not decision.passed
    (reason,) = decision.reasons
    assert reason.startswith("rouge_l was not measured for candidate (it has: eval_loss, exact_match,")


def test_champion_rules_apply_only_when_a_champion_exists():
    rules = _gate(field_accuracy={"min": 0.5})
    assert _verdicts(decide(_report(), rules)) == {("field_accuracy", "min"): True}

    # Every metric with a rule must at least tie the champion by default.
    better_champion = {**CANDIDATE, "field_accuracy": 0.75}
    decision = decide(_report(champion=better_champion), rules)
    assert _verdicts(decision) == {("field_accuracy", "min"): True, ("field_accuracy", "over_champion"): False}
    assert decision.reasons == [
        "field_accuracy is 0.625 against champion v3's 0.75: 0.125 worse, short of the required 0 higher"
    ]
    tie = decide(_report(champion=CANDIDATE), rules)
    assert tie.passed


def test_must_beat_champion_by_sets_the_margin_and_follows_each_metrics_direction():
    champion = {**CANDIDATE, "eval_loss": 2.75, "exact_match": 0.25}  # candidate: 0.25 lower loss, 0.25 more exact
    cfg = GateConfig(must_beat_champion_by={"eval_loss": 0.25, "exact_match": 0.3125})
    decision = decide(_report(champion=champion), cfg)
    assert _verdicts(decision) == {("eval_loss", "over_champion"): True, ("exact_match", "over_champion"): False}
    assert [c.value for c in decision.checks] == [0.25, 0.25]
    # A negative margin tolerates a regression of that size.
    tolerant = GateConfig(must_beat_champion_by={"exact_match": -0.5})
    assert decide(_report(champion={**CANDIDATE, "exact_match": 0.75}), tolerant).passed


def test_config_rejects_unknown_metrics_before_anything_runs(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: x\ndata: {train: t.jsonl}\nmodel: {base: m}\nollama: {model_name: x}\n"
        "gate: {rules: {valid_json: {min: 0.9}}}\n"
    )
    with pytest.raises(ConfigError, match="gate.rules.valid_json: unknown metric 'valid_json' for json answers"):
        load_config(config)
    assert load_config(config, ["gate.rules={field_accuracy.price: {min: 0.5}}"]).gate.rules["field_accuracy.price"]
    with pytest.raises(ConfigError, match="rouge_l"):
        load_config(config, ["gate.rules={rouge_l: {min: 0.5}}"])  # a text metric on JSON answers
