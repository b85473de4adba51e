"""What a flow run shows in the Prefect UI: Prefect artifacts, on the run's Artifacts tab and on the Artifacts page,
where a key keeps its versions run after run.

Every run of the finetune, retrain-from-rag and evaluate flows leaves the run report as Markdown (the decision
with one line per gate rule, the metrics, the attempts, retention, ...), the metrics of base, champion and
candidate as a table, and a link to its MLflow run; once a model was exported, a link to the GGUF and where it is
served. A run that fails its gate leaves them too: they are written before it ends. Keys read
`<pipeline>-<flow>-<what>`, lowercase with dashes, so the Artifacts page lists a pipeline's together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tunepipe.tasks.evaluate.report import label, models, retention_section
from tunepipe.tasks.evaluate.results import EvalReport, GateDecision, RunReport
from tunepipe.tasks.runtime.config import LOWER_IS_BETTER, TrackingConfig
from tunepipe.tasks.runtime.redact import redact

if TYPE_CHECKING:
    from tunepipe.flows.serve import Serving

# A Markdown image names a PNG next to report.md, which the UI cannot reach: the plots stay in MLflow.
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def artifact_key(pipeline: str, flow: str, what: str) -> str:
    """Prefect's key alphabet: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", f"{pipeline}-{flow}-{what}".lower()).strip("-")


def show_run(
    pipeline: str,
    flow: str,
    markdown: str,
    report: EvalReport | None,
    tracking: TrackingConfig,
    mlflow_run_id: str | None,
) -> None:
    """The run's report, its metrics table and its MLflow run."""
    create_markdown_artifact(
        markdown, key=artifact_key(pipeline, flow, "report"), description=f"{pipeline}: the {flow} run's report"
    )
    if report is not None:
        create_table_artifact(
            metrics_table(report),
            key=artifact_key(pipeline, flow, "metrics"),
            description=f"{pipeline}: base, champion and candidate on {report.n_samples} held-out examples",
        )
    if mlflow_run_id is not None:
        link, text = mlflow_link(tracking, mlflow_run_id)
        create_link_artifact(
            link,
            link_text=text,
            key=artifact_key(pipeline, flow, "mlflow-run"),
            description=f"{pipeline}: everything the run logged (params, metrics, report, samples)",
        )


def show_served(pipeline: str, flow: str, serving: Serving, gguf: Path) -> None:
    """The GGUF that was exported, and the Ollama tag it is served as (or why it is not)."""
    registration = serving.registration
    served = (
        f"served as Ollama {registration.ollama_tag}, model version {registration.version}"
        if serving.served
        else f"not served: {registration.message}"
    )
    create_link_artifact(
        Path(gguf).resolve().as_uri(),
        link_text=f"{Path(gguf).name}: {served}",
        key=artifact_key(pipeline, flow, "served"),
        description=redact(registration.message),
    )


def show_outcome(pipeline: str, flow: str, title: str, lines: list[str]) -> None:
    create_markdown_artifact(
        "\n".join([f"# {title}", "", *lines]) + "\n",
        key=artifact_key(pipeline, flow, "outcome"),
        description=f"{pipeline}: how the {flow} run ended",
    )


def report_markdown(page: RunReport) -> str:
    """report.md as the UI shows it: each plot named, with where it is, instead of an image the UI cannot load."""
    text = page.path.read_text(encoding="utf-8")
    return IMAGE.sub(lambda m: f"*({m[1]}: `{m[2]}` in the MLflow run's `report/` folder)*", text)


def evaluation_markdown(model: str, report: EvalReport, decision: GateDecision) -> str:
    """The evaluate flow's page: the decision, one line per rule, retention, and where the answers are."""
    lines = [
        f"# Evaluation of {model}",
        "",
        f"**Gate {decision.summary()}**",
        "",
        "## Gate",
        "",
        *(
            [f"- {'pass' if c.passed else '**FAIL**'}: {c.reason}" for c in decision.checks]
            or ["- no rules configured"]
        ),
        "",
        *retention_section(report.retention),
        f"Per-example answers of base, champion and candidate: `{report.samples_path}` (and in the MLflow run).",
    ]
    return "\n".join(lines) + "\n"


def metrics_table(report: EvalReport) -> list[dict]:
    """One row per metric, one column per model; the retention loss under the others."""
    columns = models(report)
    names = sorted({name for scores in columns for name in scores.metrics})
    rows = [
        {
            "metric": name + (" (lower is better)" if name in LOWER_IS_BETTER else ""),
            **{label(s): _number(s.metrics.get(name)) for s in columns},
        }
        for name in names
    ]
    if report.retention is not None:
        rows.append(
            {
                "metric": "retention_loss (lower is better)",
                **{label(s): "" for s in columns},
                "base": _number(report.retention.base_loss),
                "candidate": _number(report.retention.candidate_loss),
            }
        )
    return rows


def mlflow_link(tracking: TrackingConfig, run_id: str) -> tuple[str, str]:
    """The run's page on an MLflow server; for a local store, its artifact folder, and how to browse it."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracking.uri).get_run(run_id)
    if tracking.uri.startswith(("http://", "https://")):
        link = f"{tracking.uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        return redact(link), f"MLflow run {run.info.run_name} ({run_id})"
    return run.info.artifact_uri, (
        f"MLflow run {run.info.run_name} ({run_id}): its artifacts; browse the run with "
        f"`mlflow ui --backend-store-uri {redact(tracking.uri)}`"
    )


def _number(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)
