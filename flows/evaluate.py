"""The evaluate flow: score one trained model on the config's test split with the evaluation stage and the
gate, as the finetune flow's final evaluation does (with its `scored` and `measured_retention`), without
training or exporting anything. Started by the `evaluate` deployment (prefect.yaml) or `tunepipe evaluate`."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from tunepipe.flows.artifacts import evaluation_markdown, show_run
from tunepipe.flows.finetune import measured_retention, scored
from tunepipe.tasks.data.check import check_data
from tunepipe.tasks.data.format import format_data
from tunepipe.tasks.data.load import data_fingerprint, load_data
from tunepipe.tasks.evaluate.gate import gate
from tunepipe.tasks.evaluate.results import EvalReport, GateDecision
from tunepipe.tasks.integrations.model_registry import find_champion
from tunepipe.tasks.model.base import resolve_base
from tunepipe.tasks.runtime.config import PipelineConfig
from tunepipe.tasks.runtime.retries import network_retries
from tunepipe.tasks.runtime.tracking import tracked_run
from tunepipe.tasks.train.task import trained_model


class Evaluation(BaseModel):
    model: str
    model_run_id: str  # the MLflow run that trained it
    mlflow_run_id: str  # the MLflow run of this evaluation
    eval: EvalReport
    gate: GateDecision


@flow(name="evaluate")
def evaluate_model(config: PipelineConfig, model: str) -> Evaluation:
    """`model`: the MLflow run id of a finetune run, or `v<N>` for version N of the registered model."""
    cfg = config
    base = resolve_base.with_options(**network_retries(cfg.retry))(cfg.model, cfg.ollama)
    model_run_id, candidate = trained_model(cfg.tracking, cfg.name, model, cfg.workdir / "evaluate-inputs")
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id()),
        "tunepipe.kind": "evaluate",
        "evaluated.model": model,
        "evaluated.run_id": model_run_id,
        "dataset.fingerprint": data_fingerprint(cfg.data),
        "base_model": cfg.model.base,
    }
    with tracked_run(cfg, run_name=f"{cfg.name}-evaluate-{flow_run.get_name()}", tags=tags) as run:
        loaded = load_data(cfg.data, tags["dataset.fingerprint"], cfg.workdir)
        checked = check_data(loaded, cfg.data, base, cfg.model, cfg.workdir)
        run.record(loaded, checked)  # what it was scored on, as the run's dataset inputs
        formatted = format_data(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)
        champion = find_champion(cfg.tracking.uri, cfg.name)
        report = scored("test", formatted, checked, candidate, base, champion, cfg)
        report = report.model_copy(update={"retention": measured_retention(candidate, base, formatted, cfg)})
        decision = gate(report, cfg.gate)
        run.record(report, decision)
        show_run(cfg.name, "evaluate", evaluation_markdown(model, report, decision), report, cfg.tracking, run.run_id)
    return Evaluation(model=model, model_run_id=model_run_id, mlflow_run_id=run.run_id, eval=report, gate=decision)
