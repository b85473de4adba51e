"""The finetune flow: one config in, a gated, exported, parity-checked and served model out. The body is the DAG."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import BaseModel

from tunepipe.flows.artifacts import report_markdown, show_run, show_served
from tunepipe.flows.serve import Serving, serve
from tunepipe.tasks.chat.general_prompts import read_prompts
from tunepipe.tasks.data.check import DataCheckError, check_data
from tunepipe.tasks.data.format import format_data
from tunepipe.tasks.data.load import data_fingerprint, load_data
from tunepipe.tasks.data.results import CheckedData, FormattedData, HeldOutSplit
from tunepipe.tasks.evaluate.gate import gate
from tunepipe.tasks.evaluate.judge import judge
from tunepipe.tasks.evaluate.report import run_report
from tunepipe.tasks.evaluate.results import Attempt, EvalReport, GateDecision, RetentionScores, RunReport
from tunepipe.tasks.evaluate.retention import retention
from tunepipe.tasks.evaluate.retrain_plan import next_attempt, outcome
from tunepipe.tasks.evaluate.task import evaluate
from tunepipe.tasks.export.parity import parity, parity_verdicts
from tunepipe.tasks.export.results import ExportResult, ParityReport, verdicts_record
from tunepipe.tasks.export.task import export
from tunepipe.tasks.integrations.model_registry import ChampionRef, find_champion
from tunepipe.tasks.model.base import resolve_base
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.config import PipelineConfig
from tunepipe.tasks.runtime.memory_plan import run_memory_plan
from tunepipe.tasks.runtime.redact import redact, redact_logs
from tunepipe.tasks.runtime.retries import network_retries
from tunepipe.tasks.runtime.tracking import tracked_child, tracked_run
from tunepipe.tasks.runtime.worker import spare_workers, stop_spares
from tunepipe.tasks.serve.task import plan
from tunepipe.tasks.train.prestart import prestart_training
from tunepipe.tasks.train.results import HeldOut, TrainResult
from tunepipe.tasks.train.task import train


class GateFailed(RuntimeError):
    """The final candidate failed the gate on the test split: nothing was exported or registered and the champion
    did not move."""

    def __init__(
        self,
        attempts: list[Attempt],
        tested: EvalReport,
        decision: GateDecision,
        outcome: str,
        report: RunReport,
        mlflow_run_id: str,
    ):
        self.attempts, self.outcome, self.report, self.mlflow_run_id = attempts, outcome, report, mlflow_run_id
        self.eval, self.decision, self.validation = tested, decision, attempts[-1].report
        reasons = "".join(f"\n  - {reason}" for reason in decision.reasons)
        super().__init__(
            f"evaluation gate failed on the test split ({outcome}); nothing exported or registered, "
            f"the champion is unchanged. Failing rules:{reasons}\nReport: {report.path} "
            f"(MLflow run {mlflow_run_id})"
        )


class RunSummary(BaseModel):
    mlflow_run_id: str
    mlflow_tracking_uri: str
    eval: EvalReport  # the final candidate on the test split: what the gate decided on
    gate: GateDecision
    validation: EvalReport  # the same candidate on the validation split, which the retrain loop chose it by
    attempts: int
    retrain_outcome: str
    report: RunReport
    exported: ExportResult
    parity: ParityReport
    gguf_path: Path  # the one served (smallest within the parity limits)
    serving: Serving
    data_docs: Path  # Great Expectations' Data Docs (index.html); also in MLflow under data_checks/data_docs


def scored(
    split: HeldOutSplit,
    formatted: FormattedData,
    checked: CheckedData,
    trained: TrainResult,
    base: BaseModelRef,
    champion: ChampionRef | None,
    cfg: PipelineConfig,
) -> EvalReport:
    """The candidate, the base and the champion scored on one split; with `eval.judge`, a second model judges
    the answers and its metric joins the report the gate reads."""
    report = evaluate(
        formatted,
        checked,
        trained,
        base,
        champion,
        cfg.tracking.uri,
        cfg.data,
        cfg.eval,
        cfg.workdir,
        split=split,
        gpu_memory_gib=cfg.model.gpu_memory_gib,
    )
    if cfg.eval.judge is None:
        return report
    return judge.with_options(**network_retries(cfg.retry))(
        report, cfg.eval.judge, checked.held_out(split).clean_path, cfg.ollama.host, cfg.gate, cfg.workdir
    )


def measured_retention(
    trained: TrainResult, base: BaseModelRef, formatted: FormattedData, cfg: PipelineConfig
) -> RetentionScores:
    """What the candidate forgot outside its task: the base's answers to the general prompts (neither split)."""
    return retention(
        trained,
        base,
        formatted.chat,
        read_prompts(cfg.eval.retention),
        cfg.eval.retention,
        cfg.eval.batch_size,
        cfg.workdir,
    )


@flow(name="finetune")
def finetune(config: PipelineConfig) -> RunSummary | State:
    # Typed, so the Prefect UI shows a form of every config field; the CLI loads YAML into the same model.
    redact_logs()
    cfg = config
    workdir = cfg.workdir
    # First: a model that cannot be used fails before any stage runs; a hub hiccup is retried.
    base = resolve_base.with_options(**network_retries(cfg.retry))(cfg.model, cfg.ollama)
    # A run that cannot fit this machine (GPU memory, host memory, disk) is refused before any stage runs.
    run_memory_plan(cfg, base, cfg.model.max_seq_length, loss_share=1.0).check()
    fingerprint = data_fingerprint(cfg.data)
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id()),
        "prefect.flow_run_name": str(flow_run.get_name()),
        "dataset.fingerprint": fingerprint,
        "base_model": cfg.model.base,
        "base_model.fingerprint": base.fingerprint,
    }
    with tracked_run(cfg, run_name=f"{cfg.name}-{flow_run.get_name()}", tags=tags) as run, spare_workers():
        # Starting a worker is mostly importing the ML stack: the training worker's imports overlap the data
        # stages (a worker not needed, as on a cached re-run, is stopped at the end).
        prestart_training(cfg.train.backend, cfg.train.mode, cfg.train.devices)
        loaded = load_data(cfg.data, fingerprint, workdir)
        try:
            checked = check_data(loaded, cfg.data, base, cfg.model, workdir)
        except DataCheckError as exc:
            run.record(loaded, exc.checked)  # the Data Docs and the quarantine explain the failure
            raise
        run.record(loaded, checked)

        formatted = format_data(checked, base, cfg.model, cfg.train.assistant_only_loss, workdir)

        champion = find_champion(cfg.tracking.uri, cfg.name)
        # What the evaluations during training (train.eval_steps) measure and choose the best checkpoint by: the
        # validation split; given to the train stage only when it evaluates, so eval settings never invalidate
        # other trainings.
        held_out = HeldOut(
            loss_rows=formatted.validation,
            examples=checked.validation.clean_path,
            train_examples=checked.train.clean_path,
            metric=cfg.retrain.metric,
            output_format=cfg.data.output_format,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )
        # The bounded retrain loop: train, then score on validation and apply the gate's rules there, until an
        # attempt passes them or the plan gives up. Nothing in the loop reads the test split.
        attempts: list[Attempt] = []
        while attempt := next_attempt(cfg, attempts):
            with tracked_child(run, f"attempt-{attempt.number}", attempt) as attempt_run:
                trained = train(
                    formatted,
                    base,
                    cfg.model,
                    attempt.lora,
                    attempt.train,
                    workdir,
                    init_from=attempt.init_from,
                    held_out=held_out if attempt.train.eval_steps else None,
                    mlflow_run=attempt_run.live_ref(),
                )
                validated = scored("validation", formatted, checked, trained, base, champion, cfg)
                # What the candidate forgot outside its task: general prompts, neither split; the attempt's gate
                # reads it, and the test report carries the final attempt's.
                retained = measured_retention(trained, base, formatted, cfg)
                validated = validated.model_copy(update={"retention": retained})
                attempt_decision = gate(validated, cfg.gate)
                attempt_run.record(trained.curve(), validated.scores(), attempt_decision)
            attempts.append(Attempt(plan=attempt, trained=trained, report=validated, decision=attempt_decision))
        stop_spares()  # no stage after the loop trains: a spare left waiting (stages cached) takes CPU
        ended = outcome(attempts, cfg.retrain)
        # The one look at the test split: the loop's final candidate, scored once (base and champion come from
        # the reference cache on a re-run). Only this report reaches the gate; its failure ends the run.
        report = scored("test", formatted, checked, trained, base, champion, cfg)
        report = report.model_copy(update={"retention": retained})
        decision = gate(report, cfg.gate)
        run.record(formatted, trained, validated, report, decision)
        report_page = run_report(cfg.name, attempts, report, decision, ended, workdir)
        run.record(report_page)
        show_run(cfg.name, "finetune", report_markdown(report_page), report, cfg.tracking, run.run_id)
        if not decision.passed:
            raise GateFailed(attempts, report, decision, ended, report_page, run.run_id)

        exported = export(trained, base, cfg.export, workdir)
        measured = parity(
            exported,
            checked.eval.clean_path,
            checked.train.clean_path,
            cfg.data,
            cfg.eval,
            cfg.ollama,
            formatted.chat,
            workdir,
        )
        verdicts = parity_verdicts(measured, report.candidate.metrics, cfg.export)
        run.record(exported, measured, verdicts_record(verdicts))
        serving_plan = plan(
            exported, verdicts, base, cfg, run.run_id, fingerprint, checked.eval.clean_path, formatted.chat
        )
        run.record(serving_plan)
        serving = serve(serving_plan)
        show_served(cfg.name, "finetune", serving, serving_plan.gguf.path)

    get_run_logger().info("ollama: %s", serving.registration.message)
    summary = RunSummary(
        mlflow_run_id=run.run_id,
        mlflow_tracking_uri=redact(cfg.tracking.uri),
        eval=report,
        gate=decision,
        validation=validated,
        attempts=len(attempts),
        retrain_outcome=ended,
        report=report_page,
        exported=exported,
        parity=measured,
        gguf_path=serving_plan.gguf.path,
        serving=serving,
        data_docs=checked.data_docs,
    )
    if not serving.served:  # trained and exported, but not served: say so in the run's final state
        return Completed(name="Unserved", message=serving.registration.message, data=summary)
    return summary
