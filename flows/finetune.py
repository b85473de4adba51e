"""The finetune flow: one config in, a gated, exported and registered model out. The body is the DAG."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from tasks.base_model import resolve_base_model
from tasks.check_data import check_data
from tasks.config import load_config
from tasks.evaluate import EvalReport, evaluate
from tasks.export import export
from tasks.format_data import format_data
from tasks.gate import GateDecision, gate
from tasks.load_data import data_fingerprint, load_data
from tasks.ollama import Registration, register
from tasks.redact import redact, redact_logs
from tasks.report import RunReport, run_report
from tasks.retrain_plan import Attempt, next_attempt, outcome
from tasks.tracking import tracked_attempt, tracked_run
from tasks.train import train


class GateFailed(RuntimeError):
    """The last attempt failed the gate: nothing was exported or registered and the champion did not move."""

    def __init__(self, attempts: list[Attempt], outcome: str, report: RunReport, mlflow_run_id: str):
        self.attempts, self.outcome, self.report, self.mlflow_run_id = attempts, outcome, report, mlflow_run_id
        self.eval, self.decision = attempts[-1].report, attempts[-1].decision
        reasons = "".join(f"\n  - {reason}" for reason in self.decision.reasons)
        super().__init__(f"evaluation gate failed ({outcome}); nothing exported or registered, the champion is "
                         f"unchanged. Failing rules:{reasons}\nReport: {report.path} (MLflow run {mlflow_run_id})")


class RunSummary(BaseModel):
    mlflow_run_id: str
    mlflow_tracking_uri: str
    eval: EvalReport
    gate: GateDecision
    attempts: int
    retrain_outcome: str
    report: RunReport
    gguf_path: Path
    merged_dir: Path
    adapter_dir: Path
    ollama: Registration


@flow(name="finetune")
def finetune(config_path: str, overrides: list[str] | None = None) -> RunSummary:
    redact_logs()
    cfg = load_config(config_path, overrides or [])
    workdir = cfg.workdir
    base = resolve_base_model(cfg.model)  # first: a model that cannot be used fails before any stage runs
    fingerprint = data_fingerprint(cfg.data)
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id()), "prefect.flow_run_name": str(flow_run.get_name()),
        "dataset.fingerprint": fingerprint, "base_model": cfg.model.base, "base_model.fingerprint": base.fingerprint,
        "config_path": str(config_path),
    }
    with tracked_run(cfg, run_name=f"{cfg.name}-{flow_run.get_name()}", tags=tags) as run:
        loaded = load_data(cfg.data, fingerprint, workdir)
        checked = check_data(loaded, cfg.data, workdir)
        run.data_checked(loaded, checked)

        formatted = format_data(checked, base, cfg.model, cfg.train.assistant_only_loss, workdir)

        # The bounded retrain loop: train, evaluate and gate until an attempt passes or the plan gives up.
        attempts: list[Attempt] = []
        while plan := next_attempt(cfg, attempts):
            with tracked_attempt(run, plan) as attempt_run:
                trained = train(formatted, base, cfg.model, plan.lora, plan.train, workdir, init_from=plan.init_from,
                                mlflow_run=attempt_run.live_ref())
                report = evaluate(formatted, checked.eval.clean_path, trained, base, cfg.data, cfg.eval, workdir)
                decision = gate(report, cfg.gate)
                attempt_run.attempted(trained, report, decision)
            attempts.append(Attempt(plan=plan, trained=trained, report=report, decision=decision))
        ended = outcome(attempts, cfg.retrain)
        run.trained(formatted, trained)
        run.evaluated(report, decision)
        run.retrained(len(attempts), ended)
        report_page = run_report(cfg.name, attempts, ended, workdir)
        run.reported(report_page)
        if not decision.passed:
            raise GateFailed(attempts, ended, report_page, run.run_id)

        exported = export(trained, base, cfg.export, workdir)
        registration = register(exported, cfg.ollama)
        run.exported(exported, registration)

    get_run_logger().info("ollama: %s", registration.message)
    return RunSummary(
        mlflow_run_id=run.run_id, mlflow_tracking_uri=redact(cfg.tracking.uri), eval=report, gate=decision,
        attempts=len(attempts), retrain_outcome=ended, report=report_page, gguf_path=exported.gguf_path,
        merged_dir=exported.merged_dir, adapter_dir=exported.adapter_dir, ollama=registration,
    )
