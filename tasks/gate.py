"""The evaluation gate: compare measured scores with the config's thresholds. Cheap, so never cached."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from tasks.config import Thresholds
from tasks.evaluate import EvalReport


class Check(BaseModel):
    name: str
    value: float | None
    limit: float
    passed: bool


class GateDecision(BaseModel):
    passed: bool
    checks: list[Check]

    def summary(self) -> str:
        if not self.checks:
            return "passed (no thresholds configured)"
        parts = [f"{c.name}={c.value if c.value is None else round(c.value, 4)} "
                 f"({'ok' if c.passed else 'FAIL'}, limit {c.limit})" for c in self.checks]
        return ("passed: " if self.passed else "failed: ") + "; ".join(parts)


def decide(report: EvalReport, thresholds: Thresholds) -> GateDecision:
    candidate, base = report.candidate.metrics, report.base.metrics
    checks = []
    slack = 1e-9  # a value that meets its limit exactly must pass despite float rounding (0.3 - 0.2 < 0.1)

    def at_least(name: str, value: float | None, limit: float | None) -> None:
        if limit is not None:
            passed = value is not None and value >= limit - slack
            checks.append(Check(name=name, value=value, limit=limit, passed=passed))

    at_least("valid_json_rate", candidate.get("valid_json_rate"), thresholds.min_valid_json_rate)
    at_least("exact_match", candidate.get("exact_match"), thresholds.min_exact_match)
    at_least("eval_loss_improvement", base["eval_loss"] - candidate["eval_loss"],
             thresholds.min_eval_loss_improvement)
    if thresholds.max_eval_loss is not None:
        checks.append(Check(name="eval_loss", value=candidate["eval_loss"], limit=thresholds.max_eval_loss,
                            passed=candidate["eval_loss"] <= thresholds.max_eval_loss + slack))
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)


@task(name="gate")
def gate(report: EvalReport, thresholds: Thresholds) -> GateDecision:
    return decide(report, thresholds)
