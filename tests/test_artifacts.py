"""The Prefect artifacts a flow run leaves, read back from a real Prefect API: the report as Markdown (plots named,
not linked), the metrics table with retention, the MLflow link, the served GGUF; keys lowercase with dashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow

from tunepipe.flows.artifacts import artifact_key, report_markdown, show_run, show_served
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores, RetentionScores, RunReport
from tunepipe.tasks.runtime.config import TrackingConfig


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The artifacts of a flow run, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def test_keys_are_prefects_alphabet():
    assert (
        artifact_key("Demo_Products v2", "retrain-from-rag", "mlflow-run")
        == "demo-products-v2-retrain-from-rag-mlflow-run"
    )


@pytest.mark.slow
def test_a_flow_run_shows_its_report_metrics_and_links(prefect_server, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from tunepipe.flows.serve import Serving
    from tunepipe.tasks.serve.results import Registration

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "artifacts"))
    client = MlflowClient(tracking_uri=tracking.uri)
    experiment = client.create_experiment("shop", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow_run = client.create_run(experiment, run_name="shop-nightly").info.run_id

    page = tmp_path / "report"
    page.mkdir()
    (page / "report.md").write_text(
        "# Run report: shop\n\n**Failed**: the only attempt failed the gate.\n\n"
        "![metrics of base, champion and candidate](metrics.png)\n"
    )
    (tmp_path / "retention.jsonl").write_text("")
    scores = {"base": {"field_accuracy": 0.1, "eval_loss": 2.0}, "candidate": {"field_accuracy": 0.9, "eval_loss": 0.4}}
    report = EvalReport(
        n_samples=8,
        candidate=ModelScores(name="candidate", metrics=scores["candidate"]),
        base=ModelScores(name="base", metrics=scores["base"]),
        champion=None,
        samples_path=tmp_path / "samples.jsonl",
        probes_path=tmp_path / "probes.jsonl",
        retention=RetentionScores(n_prompts=4, base_loss=1.2, candidate_loss=3.4, path=tmp_path / "retention.jsonl"),
    )
    gguf = tmp_path / "model-q8_0.gguf"
    serving = Serving(
        registration=Registration(
            state="unreachable", host="http://127.0.0.1:9", message="Ollama at http://127.0.0.1:9 did not answer"
        )
    )

    @flow
    def nightly():
        show_run(
            "Shop",
            "finetune",
            report_markdown(RunReport(folder=page, path=page / "report.md", attempts=1, outcome="failed")),
            report,
            tracking,
            mlflow_run,
        )
        show_served("Shop", "finetune", serving, gguf)

    state = nightly(return_state=True)
    shown = artifacts_of(state.state_details.flow_run_id)
    assert set(shown) == {
        "shop-finetune-report",
        "shop-finetune-metrics",
        "shop-finetune-mlflow-run",
        "shop-finetune-served",
    }

    markdown = shown["shop-finetune-report"]
    assert markdown.type == "markdown" and "**Failed**" in markdown.data
    assert "![" not in markdown.data and "`metrics.png` in the MLflow run's `report/` folder" in markdown.data

    table = shown["shop-finetune-metrics"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table"
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["field_accuracy"]["candidate"] == 0.9 and by_metric["eval_loss (lower is better)"]["base"] == 2.0
    assert by_metric["retention_loss (lower is better)"] == {
        "metric": "retention_loss (lower is better)",
        "base": 1.2,
        "candidate": 3.4,
    }

    link = shown["shop-finetune-mlflow-run"]
    assert link.type == "markdown"  # Prefect stores a link as the Markdown of the link
    assert client.get_run(mlflow_run).info.artifact_uri in link.data and "shop-nightly" in link.data
    assert "mlflow ui --backend-store-uri" in link.data
    served = shown["shop-finetune-served"]
    assert gguf.as_uri() in served.data and "not served: Ollama at http://127.0.0.1:9 did not answer" in served.data
