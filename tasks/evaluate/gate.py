"""The evaluation gate: check the candidate's measured scores against the config's rules. Cheap, so never cached.

Four kinds of rule, each one check with one human-readable reason when it fails:
- `min` / `max`: limits on the candidate's value of a metric;
- `min_improvement_over_base`: the candidate beats the base model by at least this much;
- `must_beat_champion_by`: when a champion exists, the candidate beats it by at least this margin (0 by
  default for every metric with a rule: never ship a model worse than the one serving).
- `retention`: the candidate's loss on the base's own answers to general prompts outside the task may rise at most
  this much above the base's (what fine-tuning made it forget).
"Beat" and "improvement" follow the metric's better direction: lower for eval_loss, higher for the rest.
"""

from __future__ import annotations

import math
from typing import Literal

from prefect import task

from tasks.evaluate.results import Check, EvalReport, GateDecision, ModelScores, RetentionScores
from tasks.runtime.config import LOWER_IS_BETTER, GateConfig, RetentionRule

# A value that meets its limit exactly must pass despite float rounding (0.3 - 0.2 < 0.1), and a candidate
# that is the champion, scored again, must not lose to it on the last digit.
SLACK = 1e-6
RETENTION_CHECK = "retention.loss_increase"  # the retention rule's check: not a metric of the held-out split


def improvement(metric: str, candidate: float, other: float) -> float:
    """How much better the candidate is than `other` on `metric` (negative: worse)."""
    return other - candidate if metric in LOWER_IS_BETTER else candidate - other


def decide(report: EvalReport, cfg: GateConfig) -> GateDecision:
    checks: list[Check] = []
    for metric, rule in cfg.rules.items():
        value = report.candidate.metrics.get(metric)
        if rule.min is not None:
            checks.append(_limit(metric, "min", value, rule.min, report.candidate))
        if rule.max is not None:
            checks.append(_limit(metric, "max", value, rule.max, report.candidate))
        if rule.min_improvement_over_base is not None:
            checks.append(_versus(metric, "over_base", report.candidate, report.base, rule.min_improvement_over_base))
    if report.champion is not None:
        for metric, margin in cfg.champion_margins().items():
            checks.append(_versus(metric, "over_champion", report.candidate, report.champion, margin))
    # Retention is measured on the report the final decision reads; one without it (nothing the base said could
    # be scored) has no such check.
    if cfg.retention is not None and report.retention is not None:
        checks.append(retention_check(report.retention, cfg.retention))
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)


def _limit(metric: str, kind: Literal["min", "max"], value: float | None, limit: float,
           candidate: ModelScores) -> Check:
    if value is None:
        return _not_measured(metric, kind, limit, candidate)
    passed = value >= limit - SLACK if kind == "min" else value <= limit + SLACK
    if passed:
        reason = f"{metric} is {value:.4g}, {'at least' if kind == 'min' else 'at most'} {limit:g}"
    else:
        reason = f"{metric} is {value:.4g}, {'below the minimum' if kind == 'min' else 'above the maximum'} {limit:g}"
    return Check(metric=metric, kind=kind, value=value, limit=limit, passed=passed, reason=reason)


def _versus(metric: str, kind: Literal["over_base", "over_champion"], candidate: ModelScores, other: ModelScores,
            margin: float) -> Check:
    value, theirs = candidate.metrics.get(metric), other.metrics.get(metric)
    if value is None or theirs is None:
        return _not_measured(metric, kind, margin, candidate if value is None else other)
    gained = improvement(metric, value, theirs)
    passed = gained >= margin - SLACK
    who = other.name if other.version is None else f"{other.name} v{other.version}"
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    reason = (f"{metric} is {value:.4g} against {who}'s {theirs:.4g}: {abs(gained):.4g} "
              f"{'better' if gained >= 0 else 'worse'}, "
              f"{'meeting' if passed else 'short of'} the required {margin:g} {direction}")
    return Check(metric=metric, kind=kind, value=gained, limit=margin, passed=passed, reason=reason)


def retention_check(scores: RetentionScores, rule: RetentionRule) -> Check:
    """The candidate's loss on the base's own answers to general prompts may rise at most `max_loss_increase`
    nats per token above the base's: more, and it has forgotten how to answer outside its task."""
    metric, limit = RETENTION_CHECK, rule.max_loss_increase
    rise = scores.loss_increase
    passed = rise <= limit + SLACK
    measured = (f"{scores.base_loss:.3f} to {scores.candidate_loss:.3f} nats per token ({rise:+.3f}; "
                f"at most +{limit:g} allowed)")
    if passed:
        reason = (f"retention within its limit: the candidate's loss on the base's answers to {scores.n_prompts} "
                  f"general prompts went from {measured}")
    else:
        reason = (f"the candidate forgot how to chat: its loss on the base's answers to {scores.n_prompts} general "
                  f"prompts rose from {measured}; it finds what the base would say {math.exp(rise):.1f} times less "
                  "likely per token")
    return Check(metric=metric, kind="max", value=rise, limit=limit, passed=passed, reason=reason)


def _not_measured(metric: str, kind: str, limit: float, scores: ModelScores) -> Check:
    reason = (f"{metric} was not measured for {scores.name} (it has: {', '.join(sorted(scores.metrics)) or 'none'}),"
              f" so the {kind} rule cannot pass")
    return Check(metric=metric, kind=kind, value=None, limit=limit, passed=False, reason=reason)


@task(name="gate")
def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    return decide(report, cfg)
