"""The bounded retrain loop, driven for real on the tiny model: attempts as MLflow child runs, a later attempt
passing, a hopeless config ending Failed after exactly max_attempts, and the champion left alone.

Both flow tests share one work folder: the second one's first two attempts are the first one's, cached.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tunepipe.deployments.output import stage_states
from tunepipe.flows.finetune import GateFailed, finetune
from tunepipe.flows.serve import serve
from tunepipe.tasks.export.parity import parity
from tunepipe.tasks.export.task import export
from tunepipe.tasks.integrations.model_registry import CHAMPION_ALIAS, MODEL_ARTIFACT
from tunepipe.tasks.runtime.config import load_config
from tunepipe.tasks.serve.task import register

pytestmark = pytest.mark.slow  # runs the retrain loop, training for real

# One step barely moves the eval loss; eight more move it far (on the 4 x 128 tiny model from 31.6: by 1.4 and 21.6).
# The gate sits in between.
FIRST_STEPS, MORE_STEPS, REQUIRED_IMPROVEMENT = 1, 8, 5.0
LOSS_LIMIT = 11.5  # between the trained model's eval loss on validation and on a test split in another script


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: tuple[Path, Path]) -> Path:
    root = tmp_path_factory.mktemp("retrain")
    train, eval_ = demo_data
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config.update(name="retrain-test", workdir=str(root / "runs"))
    config["data"].update(train=str(train), eval=str(eval_))
    config["model"]["base"] = str(tiny_model)
    # LoRA, decaying from 5e-3: the setting the step counts above were measured with.
    config["train"].update(
        mode="lora",
        max_steps=FIRST_STEPS,
        batch_size=2,
        learning_rate=5e-3,
        lr_scheduler="linear",
        warmup_steps=0,
        logging_steps=1,
    )
    config["eval"] = {"max_samples": 4, "max_new_tokens": 16, "retention": {"builtin": 0}}
    config["gate"] = {"rules": {"eval_loss": {"min_improvement_over_base": REQUIRED_IMPROVEMENT}}, "retention": None}
    config["retrain"] = {
        "max_attempts": 3,
        "metric": "eval_loss",
        "plan": [{"continue_training": True, "max_steps": MORE_STEPS}],
    }
    config["tracking"] = {
        "uri": f"sqlite:///{root}/mlflow.db",
        "experiment": "retrain",
        "artifact_location": str(root / "mlartifacts"),
    }
    config["ollama"]["host"] = "http://127.0.0.1:9"  # nothing listens: registration is skipped
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _client(config_path: Path):
    from mlflow.tracking import MlflowClient

    uri = yaml.safe_load(config_path.read_text())["tracking"]["uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _states(state) -> dict[str, str]:
    return {name: state_name for name, state_name, _ in stage_states(state.state_details.flow_run_id)}


def _states_named(state, stage: str) -> int:
    return sum(name == stage for name, _, _ in stage_states(state.state_details.flow_run_id))


def _attempt_runs(client, parent_run_id: str) -> list:
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
    )
    return sorted(runs, key=lambda run: int(run.data.tags["retrain.attempt"]))


def test_failing_first_attempt_is_retrained_and_a_later_attempt_passes(prefect_server, config_path: Path):
    state = finetune(load_config(config_path), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.attempts == 2
    assert summary.retrain_outcome == "attempt 2 of at most 3 passed the gate on validation"
    assert _states(state)["export"] == "Completed"

    client = _client(config_path)
    first, second = _attempt_runs(client, summary.mlflow_run_id)
    assert (first.info.status, first.data.tags["gate"]) == ("FAILED", "failed")
    reasons = first.data.tags["gate.reasons"]
    assert reasons.startswith("eval_loss -") and f"short of the required {REQUIRED_IMPROVEMENT:g} lower" in reasons
    assert (second.info.status, second.data.tags["gate"]) == ("FINISHED", "passed")
    assert second.data.params["train.max_steps"] == str(MORE_STEPS)
    assert second.data.params["change.continue_training"] == "True"
    assert second.data.tags["retrain.init_from"].endswith("adapter")
    # Each attempt has its own loss curve; the continued attempt starts from the first one's weights.
    assert len(client.get_metric_history(first.info.run_id, "train_loss")) == FIRST_STEPS
    curve = client.get_metric_history(second.info.run_id, "train_loss")
    assert [m.step for m in curve] == list(range(1, MORE_STEPS + 1))
    # The loop judged each attempt on validation: that is all an attempt's run holds.
    improvement = [
        run.data.metrics["validation.base.eval_loss"] - run.data.metrics["validation.candidate.eval_loss"]
        for run in (first, second)
    ]
    assert improvement[0] < REQUIRED_IMPROVEMENT <= improvement[1]
    assert not any(name.startswith(("candidate.", "base.")) for run in (first, second) for name in run.data.metrics)
    assert [a.split for a in (summary.validation, summary.eval)] == ["validation", "test"]
    # The gate decided on test, once, after the loop: the run's gate tag and metrics are the test split's.
    assert _states_named(state, "evaluate") == 3  # two attempts on validation, the final candidate on test

    # The report, its plots and the per-example table are in the flow's run.
    parent = client.get_run(summary.mlflow_run_id)
    assert parent.data.metrics["retrain.attempts"] == 2
    logged = {a.path for folder in ("report", "eval") for a in client.list_artifacts(summary.mlflow_run_id, folder)}
    assert {
        "report/report.md",
        "report/loss_curves.png",
        "report/metrics.png",
        "eval/examples.json",
        "eval/gate.json",
    } <= logged
    report = summary.report.path.read_text()
    assert "attempt 2 of at most 3 passed the gate on validation" in report and "| 2 | `{" in report
    assert "worst test examples" in report


def test_hopeless_config_fails_after_max_attempts_and_leaves_the_champion(
    prefect_server, config_path: Path, tiny_model: Path
):
    client = _client(config_path)
    artifacts = config_path.parent / "champion-artifacts"
    champion_run = client.create_run(client.create_experiment("champion", artifacts.as_uri())).info.run_id
    client.log_artifacts(champion_run, str(tiny_model), MODEL_ARTIFACT)
    client.set_terminated(champion_run)
    client.create_registered_model("retrain-test")
    client.create_model_version("retrain-test", f"runs:/{champion_run}/{MODEL_ARTIFACT}", run_id=champion_run)
    client.set_registered_model_alias("retrain-test", CHAMPION_ALIAS, "1")

    state = finetune(load_config(config_path, ["gate.rules.eval_loss.max=0.01"]), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GateFailed)
    assert [attempt.plan.number for attempt in error.attempts] == [1, 2, 3]
    assert error.outcome == "all 3 attempts failed the gate on validation"
    assert error.eval.split == "test" and error.validation.split == "validation"
    reason = next(r for r in error.decision.reasons if "above the maximum 0.01" in r)
    assert reason in state.message  # the Prefect flow run's state says why
    # The names come from the tasks themselves, so a renamed task cannot make this pass by accident.
    assert {export.name, parity.name, serve.name, register.name}.isdisjoint(_states(state))

    attempts = _attempt_runs(client, error.mlflow_run_id)
    assert [run.data.tags["gate"] for run in attempts] == ["failed"] * 3
    parent = client.get_run(error.mlflow_run_id)
    assert parent.info.status == "FAILED" and reason in parent.data.tags["gate.reasons"]
    assert str(client.get_model_version_by_alias("retrain-test", CHAMPION_ALIAS).version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='retrain-test'")] == ["1"]


def test_a_candidate_that_passes_on_validation_and_fails_on_test_is_not_promoted_nor_retried(
    prefect_server, config_path: Path, tmp_path: Path
):
    """Validation decides whether to try again, test whether to ship: on a test split of pages in another script
    the trained model's loss stays well above its loss on validation, so a limit between the two fails the gate
    after the loop passed on validation, and the run ends there: trying again on test would make it a split that
    choices were made on."""
    rng = random.Random(0)

    def junk() -> str:
        return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(12))

    test = tmp_path / "other-script.jsonl"
    test.write_text(
        "".join(
            json.dumps(
                {
                    "input": f"<p>{junk()}</p>",
                    "output": {key: junk() for key in ("name", "price", "category", "manufacturer")},
                },
                ensure_ascii=False,
            )
            + "\n"
            for _ in range(8)
        )
    )
    state = finetune(
        load_config(config_path, [f"data.eval={test}", f"gate.rules.eval_loss.max={LOSS_LIMIT}"]), return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GateFailed)
    assert [attempt.plan.number for attempt in error.attempts] == [1, 2]  # the loop stopped when it passed
    assert (
        error.attempts[-1].decision.passed and error.outcome == "attempt 2 of at most 3 passed the gate on validation"
    )
    assert not error.decision.passed and error.eval.split == "test"
    assert error.validation.candidate.metrics["eval_loss"] < LOSS_LIMIT < error.eval.candidate.metrics["eval_loss"]
    assert "failed on the test split" in str(error) and export.name not in _states(state)
    parent = _client(config_path).get_run(error.mlflow_run_id)
    assert parent.data.tags["gate"] == "failed" and parent.info.status == "FAILED"
