"""The retrain loop's decisions and the run report, on hand-made attempts (no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunepipe.tasks.evaluate.gate import decide
from tunepipe.tasks.evaluate.report import write_report
from tunepipe.tasks.evaluate.results import Attempt, AttemptPlan, EvalReport, ModelScores
from tunepipe.tasks.evaluate.retrain_plan import apply_change, next_attempt, outcome
from tunepipe.tasks.runtime.config import (
    ConfigError,
    GateConfig,
    MetricRule,
    PipelineConfig,
    RetrainChange,
    load_config,
)
from tunepipe.tasks.train.results import LossPoint, TrainResult

GATE = GateConfig(rules={"field_accuracy": MetricRule(min=0.5)})


def _config(**retrain) -> PipelineConfig:
    return PipelineConfig(
        name="p",
        data={"train": "t.jsonl"},
        model={"base": "m"},
        ollama={"model_name": "p"},
        train={"max_steps": 100, "batch_size": 8, "learning_rate": 1e-3},
        lora={"r": 8, "alpha": 16},
        gate=GATE,
        retrain={"metric": "field_accuracy", **retrain},
    )


def _report(tmp_path: Path, name: str, field_accuracy: float, split: str = "validation") -> EvalReport:
    """A report of 3 examples on `split`: the candidate answers the first wrongly, the base answers none."""
    samples, probes = tmp_path / f"samples-{name}.jsonl", tmp_path / "probes.jsonl"
    rows = [
        {
            "id": f"ex{i}",
            "source": f"eval.jsonl:{i + 1}",
            "prompt": f"<p>page {i}</p>",
            "expected": '{"name": "Kettle"}',
            "candidate": {
                "answer": "not json" if i == 0 else '{"name": "Kettle"}',
                "stopped": i != 0,
                "scores": {"field_accuracy": 0.0 if i == 0 else 1.0},
            },
            "base": {"answer": "", "stopped": False, "scores": {"field_accuracy": 0.0}},
        }
        for i in range(3)
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    probes.write_text(json.dumps({"prompt": "What is 2+2?", "base": "", "candidate": "4"}) + "\n")
    return EvalReport(
        split=split,
        n_samples=3,
        candidate=ModelScores(name="candidate", metrics={"eval_loss": 1.0, "field_accuracy": field_accuracy}),
        base=ModelScores(name="base", metrics={"eval_loss": 9.0, "field_accuracy": 0.0}),
        champion=None,
        samples_path=samples,
        probes_path=probes,
    )


def _attempt(tmp_path: Path, plan: AttemptPlan, field_accuracy: float) -> Attempt:
    """An attempt as the loop sees it: its validation report and the gate's rules applied to it."""
    report = _report(tmp_path, f"attempt{plan.number}", field_accuracy)
    adapter = tmp_path / f"adapter{plan.number}"
    steps = plan.train.max_steps or 100
    history = [LossPoint(step=s, loss=5.0 / s, learning_rate=1e-3, elapsed_s=s) for s in range(1, steps + 1, 10)]
    trained = TrainResult(
        adapter_dir=adapter,
        kind="lora",
        backend="hf",
        loss_history=history,
        runtime_s=1.0,
        trainable_params=1,
        total_params=2,
        steps=steps,
        device="cpu x1",
        precision="fp32",
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        oom_retries=0,
        resumed_from_step=0,
    )
    return Attempt(plan=plan, trained=trained, report=report, decision=decide(report, GATE))


def _run(cfg: PipelineConfig, tmp_path: Path, scores: list[float]) -> list[Attempt]:
    """The flow's loop with each attempt's field accuracy taken from `scores`."""
    attempts: list[Attempt] = []
    while plan := next_attempt(cfg, attempts):
        attempts.append(_attempt(tmp_path, plan, scores[plan.number - 1]))
    return attempts


def test_the_plan_applies_in_order_and_its_last_change_repeats(tmp_path: Path):
    cfg = _config(
        max_attempts=4,
        plan=[{"continue_training": True, "max_steps": 50}, {"learning_rate_factor": 0.5, "lora_r": 16, "epochs": 2}],
    )
    attempts = _run(cfg, tmp_path, [0.1, 0.2, 0.3, 0.4])
    plans = [a.plan for a in attempts]
    assert [(p.train.max_steps, p.train.epochs) for p in plans] == [(100, 1), (50, 1), (None, 2), (None, 2)]
    assert [p.train.learning_rate for p in plans] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    assert [(p.lora.r, p.lora.alpha) for p in plans] == [(8, 16), (8, 16), (16, 32), (16, 32)]
    assert [p.init_from for p in plans] == [None, tmp_path / "adapter1", None, None]
    assert outcome(attempts, cfg.retrain) == "all 4 attempts failed the gate on validation"


def test_the_loop_ends_at_the_first_passing_attempt(tmp_path: Path):
    cfg = _config(max_attempts=5)
    attempts = _run(cfg, tmp_path, [0.25, 0.5, 0.75])
    assert len(attempts) == 2
    assert outcome(attempts, cfg.retrain) == "attempt 2 of at most 5 passed the gate on validation"


def test_an_attempt_that_does_not_improve_stops_the_loop_early(tmp_path: Path):
    cfg = _config(max_attempts=5, min_improvement=0.05)
    attempts = _run(cfg, tmp_path, [0.25, 0.375, 0.40625, 0.9])  # attempt 3 gains only 0.03125
    assert len(attempts) == 3
    assert outcome(attempts, cfg.retrain) == (
        "stopped after attempt 3 of 5: validation field_accuracy 0.4062 did not improve on attempt 2's 0.375 "
        "by more than 0.05"
    )


def test_lower_is_better_metrics_improve_downwards(tmp_path: Path):
    cfg = _config(max_attempts=3)
    first = _attempt(tmp_path, next_attempt(cfg, []), 0.0)
    worse = first.model_copy(
        update={
            "report": first.report.model_copy(
                update={"candidate": ModelScores(name="candidate", metrics={"eval_loss": 2.0, "field_accuracy": 0.0})}
            )
        }
    )
    loss_cfg = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"metric": "eval_loss"})})
    second = worse.model_copy(update={"plan": apply_change(first, RetrainChange(max_steps=5))})
    assert next_attempt(loss_cfg, [first, second]) is None
    assert "eval_loss 2 did not improve on attempt 1's 1" in outcome([first, second], loss_cfg.retrain)


def test_plan_steps_must_change_something_consistent(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\ndata: {train: t.jsonl}\nmodel: {base: m}\nollama: {model_name: x}\n")
    for step, problem in (
        ("{}", "changes nothing"),
        ("{max_steps: 5, epochs: 1}", "one of max_steps, epochs"),
        ("{continue_training: true, lora_r: 32}", "lora_r cannot change"),
    ):
        with pytest.raises(ConfigError, match=problem):
            load_config(config, [f"retrain.plan=[{step}]"])


def test_report_has_plots_attempts_worst_examples_and_probes(tmp_path: Path):
    cfg = _config(max_attempts=2)
    attempts = _run(cfg, tmp_path, [0.25, 0.375])
    tested = _report(tmp_path, "test", 0.3, split="test")
    written = write_report(
        "p", attempts, tested, decide(tested, GATE), outcome(attempts, cfg.retrain), tmp_path / "report"
    )
    text = written.path.read_text()
    for png in ("metrics.png", "loss_curves.png"):
        assert (written.folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    assert (
        "**Failed** the gate on the test split; the retrain loop: all 2 attempts failed the gate on validation."
    ) in text
    # The gate's lines are the test split's; the attempts table holds each attempt's rules on validation.
    assert "- **FAIL**: field_accuracy is 0.3, below the minimum 0.5" in text
    assert '| 2 | `{"continue_training": true}` | 100 | 0.001 | 8 | yes | failed: field_accuracy is 0.375' in text
    # Validation and test side by side, per model: the last attempt's validation scores beside the test scores.
    assert "| metric | base validation | base test | candidate validation | candidate test |" in text
    assert "| field_accuracy | 0 | 0 | 0.375 | 0.3 |" in text
    assert '| 2 | `{"continue_training": true}` | 100 |' in text
    # The worst example first, with its expected and actual answers.
    worst = text.index("### ex0 (eval.jsonl:1): field_accuracy 0")
    assert text.index("not json", worst) < text.index("### ex1", worst)
    assert "Candidate (cut at the length limit):" in text
    assert "| What is 2+2? |  | 4 |" in text


def test_cli_prints_the_metrics_table_every_failing_reason_and_the_report(tmp_path: Path):
    import io

    from rich.console import Console

    from tunepipe.deployments.output import Report
    from tunepipe.flows.finetune import GateFailed

    cfg = _config(max_attempts=2)
    attempts = _run(cfg, tmp_path, [0.25, 0.375])
    tested = _report(tmp_path, "test", 0.3, split="test")
    decision = decide(tested, GATE)
    written = write_report("p", attempts, tested, decision, outcome(attempts, cfg.retrain), tmp_path / "report")
    error = GateFailed(attempts, tested, decision, outcome(attempts, cfg.retrain), written, "run123")
    cli = Report(flow_run_id=None)
    cli.console = Console(file=io.StringIO(), width=200)
    cli.gate(error)
    printed = cli.console.file.getvalue()
    # base and candidate, each on validation then test; * = checked by the gate
    assert re.search(r"│ field_accuracy \* │ +0\.000 │ +0\.000 │ +0\.375 │ +0\.300 │", printed)
    assert re.search(r"┃ metric +┃ base validation ┃ base test ┃ candidate validation ┃ candidate test ┃", printed)
    assert "eval_loss" in printed and "metrics (validation: 3 examples, test: 3 examples)" in printed
    assert (
        "the evaluation gate failed on the test split (retrain loop: all 2 attempts failed the gate on validation)"
    ) in printed
    assert "- field_accuracy is 0.3, below the minimum 0.5" in printed
    assert f"report: {written.path}" in printed and "MLflow run: run123" in printed
    # What fine-tuning changed, gated metric first, and the first test example as each model answered it.
    changes = "field_accuracy 0.000 → 0.300, eval_loss 9.000 → 1.000"
    assert f"base → candidate on 3 test examples: {changes}" in printed
    assert "     base answered test eval.jsonl:1: \n" in printed
    assert "candidate answered test eval.jsonl:1: not json" in printed
    assert f"Base → candidate on 3 test examples: {changes}." in written.path.read_text()


def test_an_attempt_past_its_best_continues_from_it_gently_instead_of_training_longer(tmp_path: Path):
    """The default plan (continue for as many steps again) is replaced by retrain.past_best when the held-out
    curve peaked before its last evaluation; a curve still improving at its end follows the plan."""
    from tunepipe.tasks.train.results import EvalPoint

    cfg = _config(max_attempts=3)
    first = _attempt(tmp_path, next_attempt(cfg, []), 0.25)

    def with_curve(attempt: Attempt, best_step: int) -> Attempt:
        curve = [EvalPoint(step=s, eval_loss=1.0, elapsed_s=0.1) for s in (20, 40, 60, 80, 100)]
        trained = attempt.trained.model_copy(
            update={"eval_history": curve, "best_step": best_step, "selected_step": best_step}
        )
        return attempt.model_copy(update={"trained": trained})

    still_improving = next_attempt(cfg, [with_curve(first, 100)])
    assert (still_improving.train.max_steps, still_improving.train.learning_rate) == (100, pytest.approx(1e-3))
    assert still_improving.reason is None and still_improving.change == RetrainChange(continue_training=True)

    past = next_attempt(cfg, [with_curve(first, 40)])
    assert past.change == cfg.retrain.past_best
    assert (past.train.max_steps, past.train.learning_rate) == (50, pytest.approx(5e-4))  # half the steps and rate
    assert past.init_from == tmp_path / "adapter1"  # the returned weights: the best checkpoint under select best
    assert past.reason == (
        "attempt 1's validation field_accuracy peaked at step 40 of 100: training longer would go further past it"
    )
    # A plan that already changes the rate is followed; so is every plan with past_best off.
    gentle = _config(max_attempts=3, plan=[{"continue_training": True, "learning_rate_factor": 0.1}])
    assert next_attempt(gentle, [with_curve(first, 40)]).train.learning_rate == pytest.approx(1e-4)
    off = _config(max_attempts=3, past_best=None)
    assert next_attempt(off, [with_curve(first, 40)]).train.max_steps == 100
    # Shown in the report's attempts table.
    second = _attempt(tmp_path, past, 0.3)
    tested = _report(tmp_path, "test", 0.3, split="test")
    text = write_report("p", [first, second], tested, decide(tested, GATE), "x", tmp_path / "report").path.read_text()
    assert "(attempt 1's validation field_accuracy peaked at step 40 of 100" in text
