"""The evaluation gate on per-example scores: limits at their boundary, base and champion rules on paired intervals
(superiority and non-inferiority), regressions counted, listed and gated, and every check said in words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.tasks.evaluate.gate import decide
from tunepipe.tasks.evaluate.paired import paired_difference
from tunepipe.tasks.evaluate.results import EvalReport, GateDecision, ModelScores
from tunepipe.tasks.runtime.config import ConfigError, GateConfig, MetricRule, load_config

# Per example, for 8 examples: values exactly representable in binary floating point, so "at the boundary" means
# equal, not close. Means: valid_json_rate 0.75, exact_match 0.5, field_accuracy 0.625, stop_rate 1.0.
CANDIDATE = {
    "valid_json_rate": [1, 1, 1, 1, 1, 1, 0, 0],
    "exact_match": [1, 1, 1, 1, 0, 0, 0, 0],
    "field_accuracy": [1, 1, 1, 1, 0.5, 0.5, 0, 0],
    "stop_rate": [1] * 8,
    "eval_loss": [2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0],
}
BASE = {
    "valid_json_rate": [1, 1, 0, 0, 0, 0, 0, 0],
    "exact_match": [0] * 8,
    "field_accuracy": [0.5, 0.5, 0, 0, 0, 0, 0, 0],
    "stop_rate": [1, 1, 1, 1, 0, 0, 0, 0],
    "eval_loss": [3.0] * 8,
}
TOKENS = [4] * 8  # every answer 4 tokens: the token-weighted eval_loss is the per-example mean


def _report(
    tmp_path: Path,
    candidate: dict = CANDIDATE,
    champion: dict | None = None,
    base: dict = BASE,
    tokens: list[int] = TOKENS,
    fields: dict[str, dict[str, list]] | None = None,
) -> EvalReport:
    """samples.jsonl from per-example scores, and the report whose means they make. `fields`: per model, the
    per-field accuracies (`field_accuracy.<key>`) of each example."""
    models = {"candidate": candidate, "base": base, **({"champion": champion} if champion is not None else {})}
    n = len(candidate["exact_match"])
    rows = []
    for i in range(n):
        row = {
            "id": f"page-{i}",
            "source": f"test.jsonl:{i + 1}",
            "prompt": f"<p>page {i}</p>",
            "expected": '{"name": "Kettle", "price": "$25"}',
            "answer_tokens": tokens[i],
        }
        for who, scores in models.items():
            per_field = {f"field_accuracy.{key}": values[i] for key, values in ((fields or {}).get(who) or {}).items()}
            row[who] = {
                "answer": f"{who} answer {i}",
                "stopped": True,
                "scores": {name: float(values[i]) for name, values in scores.items()} | per_field,
            }
        rows.append(row)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def scores(who: str, values: dict) -> ModelScores:
        means = {
            name: sum(v * t for v, t in zip(column, tokens)) / sum(tokens) if name == "eval_loss" else sum(column) / n
            for name, column in values.items()
        }
        return ModelScores(name=who, version="3" if who == "champion" else None, metrics=means)

    return EvalReport(
        n_samples=n,
        candidate=scores("candidate", candidate),
        base=scores("base", base),
        champion=scores("champion", champion) if champion is not None else None,
        samples_path=samples,
        probes_path=tmp_path / "probes.jsonl",
    )


def _gate(**rules: dict) -> GateConfig:
    return GateConfig(rules={metric.replace("__", "."): MetricRule(**rule) for metric, rule in rules.items()})


def _verdicts(decision: GateDecision) -> dict[tuple[str, str], bool]:
    return {(check.metric, check.kind): check.passed for check in decision.checks}


@pytest.mark.parametrize(
    ("metric", "rule", "passing", "failing"),
    [
        ("valid_json_rate", "min", 0.75, 0.8125),  # candidate 0.75
        ("field_accuracy", "min", 0.625, 0.6875),  # candidate 0.625
        ("eval_loss", "max", 2.5, 2.4375),  # candidate 2.5
    ],
)
def test_a_limit_passes_at_its_boundary_and_fails_past_it(
    tmp_path: Path, metric: str, rule: str, passing: float, failing: float
):
    at_limit = decide(_report(tmp_path), _gate(**{metric: {rule: passing}}))
    assert _verdicts(at_limit) == {(metric, rule): True}
    assert at_limit.passed and at_limit.reasons == []
    (check,) = at_limit.checks
    assert check.n == 8 and check.interval.n == 8 and check.interval.low <= check.value <= check.interval.high

    past_limit = decide(_report(tmp_path), _gate(**{metric: {rule: failing}}))
    assert _verdicts(past_limit) == {(metric, rule): False}
    assert not past_limit.passed and past_limit.checks[0].limit == failing and len(past_limit.reasons) == 1


def test_a_limit_reports_the_values_interval_and_n(tmp_path: Path):
    decision = decide(_report(tmp_path), _gate(valid_json_rate={"min": 0.9}))
    (reason,) = decision.reasons
    # 6 of 8 valid: the exact interval of a proportion.
    assert reason == "valid_json_rate is 0.75, below the minimum 0.9 (95% interval [0.3491, 0.9681] on 8 test examples)"


def test_improvement_over_base_is_decided_on_the_paired_intervals_lower_end(tmp_path: Path):
    # exact_match: 4 wins, no loss in 8 examples: +0.5, but the exact interval reaches down to 0.5 * (2 * 0.4 - 1).
    decision = decide(
        _report(tmp_path),
        _gate(exact_match={"min_improvement_over_base": 0.0}, eval_loss={"min_improvement_over_base": 0.1}),
    )
    exact, loss = decision.checks
    assert exact.interval.method == "exact" and (exact.interval.wins, exact.interval.losses) == (4, 0)
    assert exact.value == 0.5 and exact.interval.low < 0 and not exact.passed  # +0.5 on 8 examples is noise
    assert exact.reason == (
        "exact_match +0.50 [-0.10, +0.50] over the base on 8 test examples: not shown better "
        "than the base at 95% confidence"
    )
    # eval_loss: the base's 3.0 against 2.0 and 3.0, token-weighted: 0.5 lower; the bootstrap interval of 4 ones
    # and 4 zeros is [0.125, 0.875].
    assert loss.interval.method == "bootstrap" and loss.value == pytest.approx(0.5)
    assert (loss.interval.low, loss.interval.high) == (0.125, 0.875) and loss.passed
    assert loss.reason == (
        "eval_loss -0.500 [-0.875, -0.125] against the base on 8 test examples (lower is better): "
        "more than the required 0.1 lower, at 95% confidence"
    )


def test_eval_losss_interval_weighs_each_example_by_its_answer_tokens(tmp_path: Path):
    tokens = [1, 1, 1, 1, 7, 7, 7, 7]  # the examples the candidate did not improve carry most tokens
    report = _report(tmp_path, tokens=tokens)
    (check,) = decide(report, _gate(eval_loss={"min_improvement_over_base": 0.0})).checks
    reported = report.base.metrics["eval_loss"] - report.candidate.metrics["eval_loss"]
    assert check.value == pytest.approx(reported) == pytest.approx(4 / 32)
    assert check.interval == paired_difference(
        "eval_loss", CANDIDATE["eval_loss"], BASE["eval_loss"], confidence=0.95, versus="base", weights=tokens
    )


def _fixes_10_breaks_8(n: int = 100) -> tuple[dict, dict]:
    """exact_match of a champion right on 60 examples, and a candidate that fixes 10 of its misses and breaks 8
    of its hits: +0.02 on the means."""
    champion = [1] * 60 + [0] * 40
    candidate = [0] * 8 + [1] * 52 + [1] * 10 + [0] * 30
    base = {"exact_match": [0] * n}
    return {"exact_match": candidate}, {"exact_match": champion}, base


def test_a_candidate_that_fixes_ten_and_breaks_eight_has_eight_regressions_and_fails_max_regressions_0(tmp_path):
    candidate, champion, base = _fixes_10_breaks_8()
    report = _report(tmp_path, candidate=candidate, champion=champion, base=base, tokens=[1] * 100)
    decision = decide(report, GateConfig(max_regressions=0))
    assert [r.id for r in decision.regressions] == [f"page-{i}" for i in range(8)]
    assert all(r.exact and r.fields == [] and r.versus == "champion" for r in decision.regressions)
    assert decision.regressions[0].reference_answer == "champion answer 0"
    assert decision.regressions[0].answer == "candidate answer 0"
    (check,) = decision.checks
    assert (check.kind, check.value, check.limit, check.passed, check.n) == ("regressions", 8, 0, False, 100)
    assert check.reason == (
        "8 of 100 test examples regressed against the champion v3 (8 no longer exactly right): more than the allowed 0"
    )
    assert decide(report, GateConfig(max_regressions=8)).passed
    assert not decide(report, GateConfig(max_regressions=0.05)).passed  # 5% of 100: at most 5
    within = decide(report, GateConfig(max_regressions=0.08)).checks[0]
    assert within.passed and within.reason.endswith("within the allowed 8 (0.08 of 100)")
    # Not gated unless configured, but always found (the report lists them).
    assert decide(report, GateConfig()).checks == [] and len(decide(report, GateConfig()).regressions) == 8


def test_the_old_rule_promoted_it_on_the_mean_the_paired_rule_does_not(tmp_path: Path):
    candidate, champion, base = _fixes_10_breaks_8()
    report = _report(tmp_path, candidate=candidate, champion=champion, base=base, tokens=[1] * 100)
    assert report.candidate.metrics["exact_match"] > report.champion.metrics["exact_match"]
    (check,) = decide(report, _gate(exact_match={"min": 0.0})).checks[1:]
    assert (check.kind, check.interval.wins, check.interval.losses) == ("over_champion", 10, 8)
    assert not check.passed
    assert check.reason == (
        "exact_match +0.02 [-0.07, +0.10] over the champion v3 on 100 test examples: not shown "
        "better than the champion v3 at 95% confidence"
    )


def test_superiority_needs_the_lower_end_above_the_margin_non_inferiority_above_minus_the_margin(tmp_path: Path):
    candidate, champion, base = _fixes_10_breaks_8()
    report = _report(tmp_path, candidate=candidate, champion=champion, base=base, tokens=[1] * 100)
    low = decide(report, GateConfig(must_beat_champion_by={"exact_match": 0.0})).checks[0].interval.low
    assert -0.1 < low < -0.05

    def passed(margin: float) -> bool:
        return decide(report, GateConfig(must_beat_champion_by={"exact_match": margin})).passed

    assert not passed(0.01) and not passed(0.0) and not passed(-0.05)  # better by 1 point? not even shown not worse
    assert passed(-0.1)  # the interval rules out 10 points worse
    tolerant = decide(report, GateConfig(must_beat_champion_by={"exact_match": -0.1})).checks[0]
    assert tolerant.reason.endswith(": not worse by 0.1 or more, at 95% confidence")
    strict = decide(report, GateConfig(must_beat_champion_by={"exact_match": -0.05})).checks[0]
    assert strict.reason.endswith(": possibly worse by 0.05 or more (the most tolerated), at 95% confidence")

    # A candidate clearly better: 30 fixed, 2 broken.
    clearly = {"exact_match": [0] * 2 + [1] * 58 + [1] * 30 + [0] * 10}
    better = _report(tmp_path, candidate=clearly, champion=champion, base=base, tokens=[1] * 100)
    check = decide(better, GateConfig(must_beat_champion_by={"exact_match": 0.1})).checks[0]
    assert check.passed and check.interval.low > 0.1
    assert check.reason.endswith(": more than the required 0.1 higher, at 95% confidence")
    assert not decide(better, GateConfig(must_beat_champion_by={"exact_match": 0.2})).passed


def test_a_candidate_scored_like_the_champion_keeps_the_champion(tmp_path: Path):
    report = _report(tmp_path, champion=CANDIDATE)
    decision = decide(report, _gate(field_accuracy={"min": 0.5}))
    assert _verdicts(decision) == {("field_accuracy", "min"): True, ("field_accuracy", "over_champion"): False}
    assert decision.checks[1].interval.low == decision.checks[1].interval.high == 0.0
    assert decision.regressions == []
    # A tolerance admits it.
    assert decide(
        report,
        GateConfig(rules={"field_accuracy": MetricRule(min=0.5)}, must_beat_champion_by={"field_accuracy": -0.01}),
    ).passed


def test_regressions_are_counted_per_field_for_json_answers(tmp_path: Path):
    fields = {
        "champion": {"name": [1] * 8, "price": [1, 1, 1, 0, 0, 0, 0, 0]},
        "candidate": {"name": [1, 0, 1, 1, 1, 1, 1, 1], "price": [0, 0, 1, 0, 0, 0, 0, 0]},
    }
    champion = {**CANDIDATE, "exact_match": [0] * 8}  # never exact: only fields regress
    report = _report(tmp_path, champion=champion, fields=fields)
    decision = decide(report, GateConfig(max_regressions=1))
    assert [(r.id, r.exact, r.fields) for r in decision.regressions] == [
        ("page-0", False, ["price"]),
        ("page-1", False, ["name", "price"]),
    ]
    assert decision.checks[0].reason == (
        "2 of 8 test examples regressed against the champion v3 (0 no longer "
        "exactly right; fields now wrong: price 2, name 1): more than the allowed 1"
    )
    # Before any promotion the base is the reference: it never had a field right here.
    assert decide(_report(tmp_path, fields=fields), GateConfig(max_regressions=0)).passed


def test_a_rule_without_per_example_values_cannot_pass(tmp_path: Path):
    report = _report(tmp_path, champion=CANDIDATE)
    report.samples_path.write_text("")
    decision = decide(report, GateConfig(must_beat_champion_by={"exact_match": -0.5}))
    assert not decision.passed
    assert decision.reasons == [
        "exact_match has no per-example values of both the candidate and the champion v3 "
        "in the evaluation's samples, so the rule cannot pass"
    ]
    assert not decide(report, GateConfig(max_regressions=3)).passed


def test_unmeasured_metric_fails_its_rule_and_says_so(tmp_path: Path):
    decision = decide(_report(tmp_path), _gate(rouge_l={"min": 0.0}))
    assert not decision.passed
    (reason,) = decision.reasons
    assert reason.startswith("rouge_l was not measured for candidate (it has: eval_loss, exact_match,")


def test_no_rules_passes(tmp_path: Path):
    decision = decide(_report(tmp_path), GateConfig())
    assert decision.passed and decision.checks == []
    assert decision.summary() == "passed (no rules configured)"


def test_the_decision_reaches_mlflow_and_the_run_summary_in_words(tmp_path: Path, capsys):
    from tunepipe.deployments.output import Report
    from tunepipe.tasks.evaluate.report import _regressions

    candidate, champion, base = _fixes_10_breaks_8()
    report = _report(tmp_path, candidate=candidate, champion=champion, base=base, tokens=[1] * 100)
    decision = decide(report, GateConfig(rules={"exact_match": MetricRule(min=0.5)}, max_regressions=0))
    record = decision.record()
    assert record.metrics["gate.regressions"] == 8
    assert record.tables["eval/regressions.json"]["id"] == [f"page-{i}" for i in range(8)]
    assert record.tags["gate.checks"].splitlines()[1] == (
        "exact_match +0.02 [-0.07, +0.10] over the champion v3 on 100 test examples: not shown better than the "
        "champion v3 at 95% confidence"
    )
    assert json.loads(record.texts["eval/gate.json"])["checks"][1]["interval"]["wins"] == 10
    # As the run writer logs it: a table in a real MLflow store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("gate", (tmp_path / "artifacts").as_uri())).info.run_id
    client.log_table(run_id, data=record.tables["eval/regressions.json"], artifact_file="eval/regressions.json")
    logged = json.loads(Path(client.download_artifacts(run_id, "eval/regressions.json", str(tmp_path))).read_text())
    assert logged["columns"][:2] == ["id", "source"] and [row[0] for row in logged["data"]] == [
        f"page-{i}" for i in range(8)
    ]

    Report(None).checks(decision)
    printed = " ".join(capsys.readouterr().out.split())
    assert "FAIL exact_match +0.02 [-0.07, +0.10] over the champion v3 on 100 test examples" in printed
    assert "pass exact_match is 0.62, at least 0.5" in printed

    section = "\n".join(_regressions(report, decision))
    assert section.startswith("## Regressions against champion v3: 8 of 100 examples")
    assert "### page-0 (test.jsonl:1): no longer exactly right" in section
    assert "Champion v3:\n```\nchampion answer 0\n```" in section
    assert "Candidate:\n```\ncandidate answer 0\n```" in section


def test_config_checks_max_regressions_and_confidence():
    assert GateConfig(max_regressions=3).max_regressions == 3
    assert GateConfig(max_regressions=0.02).max_regressions == 0.02
    for wrong in (1.5, -1, 1.0):
        with pytest.raises(ValueError, match="neither a count"):
            GateConfig(max_regressions=wrong)
    with pytest.raises(ValueError):
        GateConfig(confidence=1.0)
    assert GateConfig().confidence == 0.95


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
    assert load_config(config, ["gate={max_regressions: 0}"]).gate.max_regressions == 0
