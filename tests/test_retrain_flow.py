"""The retrain flow on the tiny model: nothing to do, a failed run that loses nothing, a run that trains on the
merged data set and logs it to MLflow, then `status`, `trace` and the evaluate flow against what it recorded."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tunepipe.deployments.cli import main
from tunepipe.deployments.output import stage_states
from tunepipe.flows.evaluate import evaluate_model
from tunepipe.flows.retrain import retrain
from tunepipe.tasks.data.rag_source import read_state, state_dir
from tunepipe.tasks.demo.data import write_demo_rag_log
from tunepipe.tasks.runtime.config import PipelineConfig

pytestmark = pytest.mark.slow  # runs the retrain flow


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, fast_config, prefect_server):
    root = tmp_path_factory.mktemp("retrain")
    raw = fast_config(root)
    raw["rag"].update(sql_url=f"sqlite:///{root / 'rag.db'}", min_new_examples=10)
    write_demo_rag_log(root / "rag.db", n=6)  # 5 of them rated 4 or 5: fewer than 10
    (root / "config.yaml").write_text(json.dumps(raw))
    return root, PipelineConfig.model_validate(raw)


def mlflow_client(cfg: PipelineConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


@pytest.fixture(scope="module")
def runs(setup):
    """nothing to do -> more rows arrive -> a run whose training fails -> a run that trains."""
    root, cfg = setup
    early = retrain(cfg, return_state=True)
    write_demo_rag_log(root / "rag.db", n=12)
    broken = cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": str(root / "no-such-model")})})
    failed = retrain(broken, return_state=True)
    after_failure = read_state(state_dir(cfg))
    trained = retrain(cfg, return_state=True)
    return early, failed, after_failure, trained


def test_too_few_new_examples_end_the_run_without_touching_a_model(runs, setup):
    _, cfg = setup
    early = runs[0]
    outcome = early.result()
    assert outcome.status == "nothing_to_do" and outcome.n_pending < 10 and outcome.n_new > 0
    assert "fewer than rag.min_new_examples=10" in outcome.reason
    assert [name for name, _, _ in stage_states(early.state_details.flow_run_id)] == ["collect_rag_examples"]


def test_a_failed_training_run_commits_its_rows_and_the_next_run_trains_on_them(runs, setup):
    _, cfg = setup
    _, failed, after_failure, trained = runs
    assert failed.is_failed()
    assert after_failure.version == 1 and after_failure.n_rag_trained == 0 and after_failure.n_rag >= 10

    outcome = trained.result()
    assert trained.is_completed() and outcome.status == "kept_champion"
    assert "not served" in outcome.reason and "Ollama not reachable" in outcome.reason
    assert outcome.n_new == 0 and outcome.n_pending == after_failure.n_rag  # nothing new, nothing lost
    assert outcome.snapshot.version == 2
    assert outcome.snapshot.rows_by_source == {"base": 400, "sql:rag_examples": after_failure.n_rag}
    state = read_state(state_dir(cfg))
    assert state.n_rag_trained == state.n_rag == after_failure.n_rag
    refs = [json.loads(line)["rag"]["ref"] for line in (outcome.snapshot.folder / "rag.jsonl").open()]
    assert len(refs) == len(set(refs)) == after_failure.n_rag


def test_the_merged_dataset_is_the_mlflow_runs_input(runs, setup):
    _, cfg = setup
    outcome = runs[3].result()
    run = mlflow_client(cfg).get_run(outcome.mlflow_run_id)
    assert run.data.tags["dataset.fingerprint"] == outcome.snapshot.fingerprint
    assert run.data.params["data.train"] == str(outcome.snapshot.data.train)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}  # beside the finetune run's three splits
    assert set(inputs) == {
        "demo-products-rag-v2",
        "demo-products-train",
        "demo-products-validation",
        "demo-products-eval",
    }
    dataset_input = inputs["demo-products-rag-v2"]
    profile = json.loads(dataset_input.dataset.profile)
    assert dataset_input.dataset.name == "demo-products-rag-v2"
    assert profile["rows_by_source"] == outcome.snapshot.rows_by_source
    assert profile["fingerprint"] == outcome.snapshot.fingerprint
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    logged = {a.path for a in mlflow_client(cfg).list_artifacts(outcome.mlflow_run_id, "dataset")}
    assert logged == {"dataset/manifest.json", "dataset/rag.jsonl"}


def test_status_and_trace_follow_an_ollama_tag_to_its_run_and_rows(runs, setup, capsys):
    root, cfg = setup
    outcome = runs[3].result()
    client = mlflow_client(cfg)
    # What promotion writes (the champion contract in DESIGN.md), done here by hand.
    client.create_registered_model(cfg.name)
    version = client.create_model_version(
        cfg.name,
        f"runs:/{outcome.mlflow_run_id}/model",
        outcome.mlflow_run_id,
        tags={
            "run_id": outcome.mlflow_run_id,
            "ollama.tag": "tunepipe-demo:1",
            "dataset.fingerprint": outcome.snapshot.fingerprint,
        },
    )
    client.set_registered_model_alias(cfg.name, "champion", version.version)

    from tunepipe.deployments.status import gather_status, gather_trace

    trace = gather_trace(cfg, "tunepipe-demo:1", rows=3)
    assert trace.run_id == outcome.mlflow_run_id and trace.dataset_fingerprint == outcome.snapshot.fingerprint
    (rag,) = [d for d in trace.datasets if d["name"] == "demo-products-rag-v2"]  # beside the train and eval rows
    assert rag["rows_by_source"] == outcome.snapshot.rows_by_source
    with sqlite3.connect(root / "rag.db") as db:
        rated = [str(i) for (i,) in db.execute("select id from rag_examples where rating >= 4 order by id limit 3")]
    assert [row["ref"] for row in trace.source_rows] == rated
    assert all(row["source"] == "sql:rag_examples" and row["rating"] >= 4 for row in trace.source_rows)
    assert gather_trace(cfg, "tunepipe-demo:latest", rows=0).run_id == outcome.mlflow_run_id

    status = gather_status(cfg)
    assert status.champion.version == str(version.version)
    assert outcome.mlflow_run_id in {r.run_id for r in status.pending_registrations}
    assert (status.last_runs[0].run_id, status.last_runs[0].gate) == (outcome.mlflow_run_id, "passed")
    assert status.rag.snapshot_version == 2 and status.rag.new_rows == 0 and status.rag.examples_untrained == 0

    assert main(["trace", "tunepipe-demo:9", str(root / "config.yaml")]) == 1
    assert main(["status", str(root / "config.yaml")]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "no version of registered model 'demo-products' has tag ollama.tag=tunepipe-demo:9" in printed
    assert f"champion of 'demo-products': v{version.version}" in printed


def test_evaluate_flow_scores_a_registered_version(runs, setup):
    _, cfg = setup
    outcome = runs[3].result()
    state = evaluate_model(cfg, "v1", return_state=True)
    evaluation = state.result()
    assert evaluation.model_run_id == outcome.mlflow_run_id
    # v1 is the champion (promoted by hand above): its own rule passes, but scored against itself it is not shown
    # better than the champion, so the gate would keep the champion.
    assert evaluation.eval.n_samples == 2
    assert [(c.kind, c.passed) for c in evaluation.gate.checks] == [("min", True), ("over_champion", False)]
    assert "not shown better than the champion v1" in evaluation.gate.reasons[0]
    run = mlflow_client(cfg).get_run(evaluation.mlflow_run_id)
    assert run.data.tags["evaluated.run_id"] == outcome.mlflow_run_id
    assert run.data.metrics["candidate.eval_loss"] == pytest.approx(evaluation.eval.candidate.metrics["eval_loss"])
