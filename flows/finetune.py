"""The finetune flow: one config in, a gated, exported and registered model out. The body is the DAG."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from tasks.base_model import resolve_base_model
from tasks.check_data import check_data
from tasks.config import PipelineConfig
from tasks.evaluate import EvalReport, evaluate
from tasks.export import export
from tasks.format_data import format_data
from tasks.gate import GateDecision, gate
from tasks.load_data import data_fingerprint, load_data
from tasks.ollama import Registration, register
from tasks.redact import redact, redact_logs
from tasks.tracking import tracked_run
from tasks.train import train


class GateFailed(RuntimeError):
    def __init__(self, decision: GateDecision, mlflow_run_id: str):
        super().__init__(f"evaluation gate {decision.summary()}; nothing exported (MLflow run {mlflow_run_id})")
        self.decision = decision
        self.mlflow_run_id = mlflow_run_id


class RunSummary(BaseModel):
    mlflow_run_id: str
    mlflow_tracking_uri: str
    eval: EvalReport
    gate: GateDecision
    gguf_path: Path
    merged_dir: Path
    adapter_dir: Path
    ollama: Registration


@flow(name="finetune")
def finetune(config: PipelineConfig) -> RunSummary:
    # Typed, so the Prefect UI shows a form of every config field; the CLI loads YAML into the same model.
    redact_logs()
    cfg = config
    workdir = cfg.workdir
    base = resolve_base_model(cfg.model)  # first: a model that cannot be used fails before any stage runs
    fingerprint = data_fingerprint(cfg.data)
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id()), "prefect.flow_run_name": str(flow_run.get_name()),
        "dataset.fingerprint": fingerprint, "base_model": cfg.model.base, "base_model.fingerprint": base.fingerprint,
    }
    with tracked_run(cfg, run_name=f"{cfg.name}-{flow_run.get_name()}", tags=tags) as run:
        loaded = load_data(cfg.data, fingerprint, workdir)
        checked = check_data(loaded, cfg.data, workdir)
        run.data_checked(loaded, checked)

        formatted = format_data(checked, base, cfg.model, cfg.train.assistant_only_loss, workdir)
        trained = train(formatted, base, cfg.model, cfg.lora, cfg.train, workdir, mlflow_run=run.live_ref())
        run.trained(formatted, trained)

        report = evaluate(formatted, checked.eval.clean_path, trained, base, cfg.data, cfg.eval, workdir)
        decision = gate(report, cfg.eval.thresholds)
        run.evaluated(report, decision)
        if not decision.passed:
            raise GateFailed(decision, run.run_id)

        exported = export(trained, base, cfg.export, workdir)
        registration = register(exported, cfg.ollama)
        run.exported(exported, registration)

    get_run_logger().info("ollama: %s", registration.message)
    return RunSummary(
        mlflow_run_id=run.run_id, mlflow_tracking_uri=redact(cfg.tracking.uri), eval=report, gate=decision,
        gguf_path=exported.gguf_path, merged_dir=exported.merged_dir, adapter_dir=exported.adapter_dir,
        ollama=registration,
    )
