"""The evaluation gate: check the candidate against the config's rules, on the test examples' per-example scores
(the evaluation's samples.jsonl). Cheap, so never cached.

Five kinds of rule, each one check with one sentence in words, pass or fail:
- `min` / `max`: limits on the candidate's value of a metric; the value decides, its interval is reported;
- `min_improvement_over_base`: the candidate beats the base model by more than this;
- `must_beat_champion_by`: when a champion exists, the candidate beats it by more than this margin (0 by default
  for every metric with a rule);
- `max_regressions`: at most this many test examples that the champion (the base before the first promotion)
  had right and the candidate has wrong;
- `retention`: the candidate's loss on the base's own answers to general prompts outside the task may rise at most
  this much above the base's (what fine-tuning made it forget).
"Beat" is decided on the paired interval of candidate − other (`tunepipe.tasks.evaluate.paired`): its lower end must be
above the margin (`paired.clears`). At margin 0 the candidate must be shown better, not merely not shown worse: a
mean that is not lower lets a worse model through whenever the sample favours it, and swaps an equal one in on
noise (benchmarks/RESULTS.md, "The gate's power"). "Better" follows the metric's direction: lower for eval_loss.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Literal

from prefect import task

from tunepipe.tasks.evaluate.paired import SLACK, PairedDifference, clears, mean_interval, paired_difference
from tunepipe.tasks.evaluate.results import Check, EvalReport, GateDecision, ModelScores, Regression, RetentionScores
from tunepipe.tasks.runtime.config import LOWER_IS_BETTER, GateConfig, RetentionRule

# Metrics whose split value is a mean over answer tokens, not over examples: their intervals weigh each example
# by its answer tokens (samples.jsonl's `answer_tokens`), so they are intervals of the reported value.
TOKEN_WEIGHTED = {"eval_loss"}
RETENTION_CHECK = "retention.loss_increase"  # the retention rule's check: not a metric of the held-out split


def decide(report: EvalReport, cfg: GateConfig) -> GateDecision:
    rows = read_samples(report.samples_path)
    # The gate decides on the test split; the retrain loop may also gate its attempts on the validation split.
    examples = f"{report.split} examples"
    checks: list[Check] = []
    for metric, rule in cfg.rules.items():
        for kind, limit in (("min", rule.min), ("max", rule.max)):
            if limit is not None:
                checks.append(_limit(rows, metric, kind, limit, report.candidate, cfg.confidence, examples))
        if rule.min_improvement_over_base is not None:
            checks.append(
                _versus(
                    rows,
                    metric,
                    "over_base",
                    report.candidate,
                    report.base,
                    rule.min_improvement_over_base,
                    cfg.confidence,
                    examples,
                )
            )
    if report.champion is not None:
        for metric, margin in cfg.champion_margins().items():
            checks.append(
                _versus(
                    rows, metric, "over_champion", report.candidate, report.champion, margin, cfg.confidence, examples
                )
            )
    reference = report.champion or report.base
    regressions = find_regressions(rows, reference.name)
    if cfg.max_regressions is not None:
        checks.append(_regressions(regressions, cfg.max_regressions, len(rows), _who(reference), examples))
    # A report without retention (nothing the base said to the general prompts could be scored) has no such check.
    if cfg.retention is not None and report.retention is not None:
        checks.append(retention_check(report.retention, cfg.retention, cfg.confidence))
    return GateDecision(passed=all(c.passed for c in checks), checks=checks, regressions=regressions)


def read_samples(path: Path) -> list[dict]:
    """The evaluation's per-example rows; none when it wrote none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def per_example(rows: list[dict], metric: str, *models: str) -> tuple[list[list[float]], list[float] | None]:
    """Each model's values of `metric` on the rows where all of `models` have one (per-field accuracies exist only
    where the expected answer has the field), and the rows' answer tokens for a token-weighted metric."""
    both = [row for row in rows if all(who in row and metric in row[who]["scores"] for who in models)]
    values = [[row[who]["scores"][metric] for row in both] for who in models]
    weighted = metric in TOKEN_WEIGHTED and all("answer_tokens" in row for row in both)
    return values, [row["answer_tokens"] for row in both] if weighted else None


def find_regressions(rows: list[dict], versus: str) -> list[Regression]:
    """The examples `versus` had right that the candidate has wrong: matched exactly (exact_match 1 -> 0), or a
    JSON field right (field_accuracy.<key> 1 -> 0)."""
    found = []
    for row in rows:
        if versus not in row or "candidate" not in row:
            continue
        theirs, mine = row[versus]["scores"], row["candidate"]["scores"]
        exact = theirs.get("exact_match") == 1 and mine.get("exact_match") == 0
        fields = [
            name.removeprefix("field_accuracy.")
            for name, value in theirs.items()
            if name.startswith("field_accuracy.") and value == 1 and mine.get(name) == 0
        ]
        if exact or fields:
            found.append(
                Regression(
                    id=str(row["id"]),
                    source=row["source"],
                    prompt=row["prompt"],
                    expected=row["expected"],
                    versus=versus,
                    reference_answer=row[versus]["answer"],
                    answer=row["candidate"]["answer"],
                    exact=exact,
                    fields=fields,
                )
            )
    return found


def _limit(
    rows: list[dict],
    metric: str,
    kind: Literal["min", "max"],
    limit: float,
    candidate: ModelScores,
    confidence: float,
    examples: str,
) -> Check:
    value = candidate.metrics.get(metric)
    if value is None:
        return _not_measured(metric, kind, limit, candidate)
    passed = value >= limit - SLACK if kind == "min" else value <= limit + SLACK
    if passed:
        reason = f"{metric} is {value:.4g}, {'at least' if kind == 'min' else 'at most'} {limit:g}"
    else:
        reason = f"{metric} is {value:.4g}, {'below the minimum' if kind == 'min' else 'above the maximum'} {limit:g}"
    (values,), weights = per_example(rows, metric, "candidate")
    interval = mean_interval(metric, values, confidence=confidence, weights=weights) if values else None
    if interval is not None:
        reason += f" ({confidence:.0%} interval [{interval.low:.4g}, {interval.high:.4g}] on {interval.n} {examples})"
    return Check(
        metric=metric,
        kind=kind,
        value=value,
        limit=limit,
        passed=passed,
        reason=reason,
        interval=interval,
        n=interval.n if interval else None,
    )


def _versus(
    rows: list[dict],
    metric: str,
    kind: Literal["over_base", "over_champion"],
    candidate: ModelScores,
    other: ModelScores,
    margin: float,
    confidence: float,
    examples: str,
) -> Check:
    if metric not in candidate.metrics or metric not in other.metrics:
        return _not_measured(metric, kind, margin, candidate if metric not in candidate.metrics else other)
    who = _who(other)
    (mine, theirs), weights = per_example(rows, metric, "candidate", other.name)
    if not mine:
        return Check(
            metric=metric,
            kind=kind,
            value=None,
            limit=margin,
            passed=False,
            n=0,
            reason=f"{metric} has no per-example values of both the candidate and {who} in the evaluation's "
            "samples, so the rule cannot pass",
        )
    interval = paired_difference(metric, mine, theirs, confidence=confidence, versus=other.name, weights=weights)
    passed = clears(interval, margin)
    unit = "lower" if metric in LOWER_IS_BETTER else "higher"
    at = f"at {confidence:.0%} confidence"
    if margin > 0:
        verdict = (
            f"more than the required {margin:g} {unit}, {at}"
            if passed
            else f"short of the required {margin:g} {unit} {at}"
        )
    elif margin == 0:
        verdict = f"better, {at}" if passed else f"not shown better than {who} {at}"
    else:
        verdict = (
            f"not worse by {-margin:g} or more, {at}"
            if passed
            else f"possibly worse by {-margin:g} or more (the most tolerated), {at}"
        )
    return Check(
        metric=metric,
        kind=kind,
        value=interval.difference,
        limit=margin,
        passed=passed,
        reason=f"{interval.statement(who, examples)}: {verdict}",
        interval=interval,
        n=interval.n,
    )


def _regressions(regressions: list[Regression], allowed: int | float, n: int, who: str, examples: str) -> Check:
    most = allowed if isinstance(allowed, int) else math.floor(allowed * n)
    if not n:
        return Check(
            metric="regressions",
            kind="regressions",
            value=None,
            limit=most,
            passed=False,
            n=0,
            reason="the evaluation's samples hold no per-example answers, so the max_regressions rule cannot pass",
        )
    passed = len(regressions) <= most
    fields = Counter(field for regression in regressions for field in regression.fields)
    detail = f"{sum(r.exact for r in regressions)} no longer exactly right"
    if fields:
        detail += "; fields now wrong: " + ", ".join(f"{name} {count}" for name, count in fields.most_common())
    limit = f"{most}" if isinstance(allowed, int) else f"{most} ({allowed:g} of {n})"
    reason = (
        f"{len(regressions)} of {n} {examples} regressed against {who} ({detail}): "
        f"{'within' if passed else 'more than'} the allowed {limit}"
    )
    return Check(
        metric="regressions", kind="regressions", value=len(regressions), limit=most, passed=passed, reason=reason, n=n
    )


def _who(scores: ModelScores) -> str:
    return f"the {scores.name}" if scores.version is None else f"the {scores.name} v{scores.version}"


def retention_check(scores: RetentionScores, rule: RetentionRule, confidence: float) -> Check:
    """The candidate's loss on the base's own answers to general prompts may rise at most `max_loss_increase`
    nats per token above the base's: more, and it has forgotten how to answer outside its task. The mean rise
    decides, as the value decides a min / max rule; its paired interval over the prompts is reported with it."""
    metric, limit = RETENTION_CHECK, rule.max_loss_increase
    rise = scores.loss_increase
    passed = rise <= limit + SLACK
    interval = retention_interval(scores, confidence)
    spread = (
        f" [{-interval.high:+.3f}, {-interval.low:+.3f}] at {interval.confidence:.0%} confidence" if interval else ""
    )
    measured = (
        f"{scores.base_loss:.3f} to {scores.candidate_loss:.3f} nats per token ({rise:+.3f}{spread}; "
        f"at most +{limit:g} allowed)"
    )
    if passed:
        reason = (
            f"retention within its limit: the candidate's loss on the base's answers to {scores.n_prompts} "
            f"general prompts went from {measured}"
        )
    else:
        reason = (
            f"the candidate forgot how to chat: its loss on the base's answers to {scores.n_prompts} general "
            f"prompts rose from {measured}; it finds what the base would say {math.exp(rise):.1f} times less "
            "likely per token"
        )
    return Check(
        metric=metric,
        kind="max",
        value=rise,
        limit=limit,
        passed=passed,
        reason=reason,
        interval=interval,
        n=interval.n if interval else None,
    )


def retention_interval(scores: RetentionScores, confidence: float) -> PairedDifference | None:
    """base − candidate `retention_loss` per prompt (the rise, negated: positive is better, as every paired
    difference), token-weighted, with its paired bootstrap interval; None when no prompt was scored."""
    scored = [
        row for row in scores.rows() if row["tokens"] and None not in (row["base"]["loss"], row["candidate"]["loss"])
    ]
    if not scored:
        return None
    return paired_difference(
        "retention_loss",
        [row["candidate"]["loss"] for row in scored],
        [row["base"]["loss"] for row in scored],
        confidence=confidence,
        versus="base",
        weights=[row["tokens"] for row in scored],
    )


def _not_measured(metric: str, kind: str, limit: float, scores: ModelScores) -> Check:
    reason = (
        f"{metric} was not measured for {scores.name} (it has: {', '.join(sorted(scores.metrics)) or 'none'}),"
        f" so the {kind} rule cannot pass"
    )
    return Check(metric=metric, kind=kind, value=None, limit=limit, passed=False, reason=reason)


@task(name="gate")
def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    return decide(report, cfg)
