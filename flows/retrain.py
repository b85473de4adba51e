"""The retrain flow: fold the RAG examples logged since the last run into the training set and, when there are
enough, fine-tune a candidate that replaces the champion only if the finetune flow's gate and Ollama smoke
test pass. Scheduled nightly by the `retrain-from-rag` deployment (prefect.yaml)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel

from tunepipe.flows.artifacts import report_markdown, show_outcome, show_run, show_served
from tunepipe.flows.finetune import GateFailed, RunSummary, finetune
from tunepipe.tasks.data.rag_source import (
    Snapshot,
    collect_rag_examples,
    commit_rag_snapshot,
    discard,
    mark_trained,
    retrain_lock,
    state_dir,
)
from tunepipe.tasks.runtime.config import PipelineConfig
from tunepipe.tasks.runtime.tracking import RunWriter, find_run_of_flow_run


class RetrainOutcome(BaseModel):
    status: Literal["nothing_to_do", "promoted", "kept_champion"]
    reason: str
    n_new: int  # examples accepted from the sources in this run
    n_pending: int  # new + committed earlier but not yet trained on
    snapshot: Snapshot | None = None
    mlflow_run_id: str | None = None
    summary: RunSummary | None = None


@flow(name="retrain-from-rag")
def retrain(config: PipelineConfig) -> RetrainOutcome:
    logger = get_run_logger()
    if config.rag is None:
        raise ValueError("retrain needs a `rag` section in the config: where the logged RAG examples are")

    with retrain_lock(state_dir(config), logger):  # a second trigger waits, then finds what is left to do
        ended = _retrain(config, logger)
    snapshot = f"dataset v{ended.snapshot.version} ({ended.snapshot.fingerprint[:12]})" if ended.snapshot else "none"
    show_outcome(
        config.name,
        "retrain-from-rag",
        f"Nightly retrain: {ended.status.replace('_', ' ')}",
        [
            ended.reason,
            "",
            f"- new examples: {ended.n_new}; pending: {ended.n_pending}",
            f"- snapshot: {snapshot}",
            f"- MLflow run: {ended.mlflow_run_id or 'none'}",
        ],
    )
    return ended


def _retrain(config: PipelineConfig, logger) -> RetrainOutcome:
    collected = collect_rag_examples(config)
    logger.info(
        "read %d new rows: %d accepted, %d skipped %s, %d rejected; %d pending in all",
        collected.n_read,
        collected.n_new,
        sum(collected.skipped.values()),
        collected.skipped,
        collected.n_rejected,
        collected.n_pending,
    )
    if collected.n_pending < config.rag.min_new_examples:
        discard(collected)  # the watermark stays: these rows count again next time
        reason = (
            f"nothing to do: {collected.n_pending} new examples, fewer than "
            f"rag.min_new_examples={config.rag.min_new_examples}"
        )
        logger.info(reason)
        return RetrainOutcome(
            status="nothing_to_do", reason=reason, n_new=collected.n_new, n_pending=collected.n_pending
        )

    snapshot = commit_rag_snapshot(collected, config)
    logger.info("dataset v%d (%s): %s", snapshot.version, snapshot.fingerprint[:12], snapshot.rows_by_source)
    state = finetune(config.model_copy(update={"data": snapshot.data}), return_state=True)
    run_id = find_run_of_flow_run(config.tracking, str(state.state_details.flow_run_id))
    if run_id is not None:
        RunWriter(config.tracking.uri, run_id, config.name).record(snapshot)

    outcome = dict(n_new=collected.n_new, n_pending=collected.n_pending, snapshot=snapshot, mlflow_run_id=run_id)
    # The finetune run's report, metrics and links on this run's page too: the run a schedule started.
    ran = state.result(raise_on_failure=False)
    if isinstance(ran, (RunSummary, GateFailed)):
        show_run(config.name, "retrain-from-rag", report_markdown(ran.report), ran.eval, config.tracking, run_id)
    if isinstance(ran, RunSummary):
        show_served(config.name, "retrain-from-rag", ran.serving, ran.gguf_path)
    if state.is_completed():
        mark_trained(state_dir(config), snapshot)
        summary = state.result()
        message = summary.serving.registration.message
        if summary.serving.served:  # registered, smoke-tested and promoted
            return RetrainOutcome(status="promoted", reason=message, summary=summary, **outcome)
        reason = f"champion kept: the candidate passed the gate but was not served ({message})"
        logger.warning(reason)
        return RetrainOutcome(status="kept_champion", reason=reason, summary=summary, **outcome)

    error = state.result(raise_on_failure=False)
    if isinstance(error, GateFailed):
        mark_trained(state_dir(config), snapshot)  # trained and judged: retraining the same data changes nothing
        reason = f"champion kept: {error}"
        logger.warning(reason)
        return RetrainOutcome(status="kept_champion", reason=reason, **outcome)
    # Anything else is a failure of the run, not a verdict on the data: the snapshot stays pending for the
    # next run, and this flow run fails with the finetune error.
    raise error
