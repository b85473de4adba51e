"""The evaluation gate: every threshold at its boundary, absent thresholds ignored, the summary text."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import Thresholds
from tasks.evaluate import EvalReport, ModelScores
from tasks.gate import GateDecision, decide

# Values exactly representable in binary floating point, so "at the boundary" means equal, not close.
def _scores(name: str = "candidate", **metrics: float) -> ModelScores:
    return ModelScores(name=name, metrics=metrics)


CANDIDATE = _scores(eval_loss=2.5, valid_json_rate=0.75, exact_match=0.5, stop_rate=1.0)
BASE = _scores("base", eval_loss=3.0, valid_json_rate=0.25, exact_match=0.0, stop_rate=0.5)


def _report(candidate: ModelScores = CANDIDATE, base: ModelScores = BASE) -> EvalReport:
    return EvalReport(n_samples=8, candidate=candidate, base=base, champion=None,
                      samples_path=Path("samples.jsonl"), probes_path=Path("probes.jsonl"))


def _verdicts(decision: GateDecision) -> dict[str, bool]:
    return {check.name: check.passed for check in decision.checks}


@pytest.mark.parametrize(
    ("field", "check", "passing", "failing"),
    [
        ("min_valid_json_rate", "valid_json_rate", 0.75, 0.8),  # candidate 0.75
        ("min_exact_match", "exact_match", 0.5, 0.5625),  # candidate 0.5
        ("max_eval_loss", "eval_loss", 2.5, 2.4375),  # candidate 2.5
        ("min_eval_loss_improvement", "eval_loss_improvement", 0.5, 0.5625),  # 3.0 - 2.5
    ],
)
def test_each_threshold_passes_at_its_boundary_and_fails_past_it(
    field: str, check: str, passing: float, failing: float
) -> None:
    at_limit = decide(_report(), Thresholds(**{field: passing}))
    assert _verdicts(at_limit) == {check: True}
    assert at_limit.passed

    past_limit = decide(_report(), Thresholds(**{field: failing}))
    assert _verdicts(past_limit) == {check: False}
    assert not past_limit.passed
    assert past_limit.checks[0].limit == failing


def test_no_thresholds_passes() -> None:
    decision = decide(_report(), Thresholds())
    assert decision.passed
    assert decision.checks == []
    assert decision.summary() == "passed (no thresholds configured)"


def test_unset_thresholds_are_ignored() -> None:
    # A terrible candidate: only the one configured check may decide.
    bad = _scores(eval_loss=9.0, valid_json_rate=0.0, exact_match=0.0, stop_rate=0.0)
    decision = decide(_report(candidate=bad), Thresholds(max_eval_loss=10.0))
    assert _verdicts(decision) == {"eval_loss": True}
    assert decision.passed


def test_improvement_is_base_loss_minus_candidate_loss() -> None:
    decision = decide(_report(), Thresholds(min_eval_loss_improvement=0.25))
    (check,) = decision.checks
    assert check.value == pytest.approx(0.5)  # 3.0 - 2.5, not 2.5 - 3.0
    assert check.passed

    worse = _scores(eval_loss=3.5, valid_json_rate=0.75, exact_match=0.5, stop_rate=1.0)
    regression = decide(_report(candidate=worse), Thresholds(min_eval_loss_improvement=0.0))
    assert regression.checks[0].value == pytest.approx(-0.5)
    assert not regression.passed


def test_json_rate_threshold_fails_when_answers_were_not_json_scored() -> None:
    text_scores = _scores(eval_loss=2.5, exact_match=0.5, rouge_l=0.5, stop_rate=1.0)
    decision = decide(_report(candidate=text_scores), Thresholds(min_valid_json_rate=0.0))
    assert _verdicts(decision) == {"valid_json_rate": False}
    assert "valid_json_rate=None (FAIL" in decision.summary()


def test_one_failing_check_fails_the_gate_and_the_summary_says_which() -> None:
    thresholds = Thresholds(min_exact_match=0.9, max_eval_loss=3.0, min_valid_json_rate=0.5)
    decision = decide(_report(), thresholds)
    assert _verdicts(decision) == {"valid_json_rate": True, "exact_match": False, "eval_loss": True}
    assert not decision.passed
    summary = decision.summary()
    assert summary.startswith("failed: ")
    assert "exact_match=0.5 (FAIL, limit 0.9)" in summary
    assert "eval_loss=2.5 (ok, limit 3.0)" in summary
    assert summary.count("FAIL") == 1


def test_passing_summary() -> None:
    decision = decide(_report(), Thresholds(max_eval_loss=3.0))
    assert decision.summary() == "passed: eval_loss=2.5 (ok, limit 3.0)"
