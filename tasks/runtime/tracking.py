"""The one MLflow writer: every param, metric, tag and artifact of a pipeline run goes through `RunWriter`.

Each stage's result type says what of it a run keeps (its `record()` method returns a `Record`,
tasks/runtime/records.py); this module writes records and knows no stage. Params, tags and text artifacts
pass through `redact` here, so a tracking URI or token never reaches the store, whoever recorded it. Files
(folders, JSONL, Data Docs) are logged as they are.

The flows record each stage's result right after the stage, not inside it, so a run whose stages were all
cache hits still records everything those stages produced.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tunepipe.tasks.runtime.config import PipelineConfig, TrackingConfig
from tunepipe.tasks.runtime.records import DatasetRecord, MlflowRunRef, Record, Recorded, flatten
from tunepipe.tasks.runtime.redact import error_line, redact

PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000  # MLflow's limits per log_batch
LONGEST_PARAM = 6000


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used; raised before any stage runs, so nothing was trained."""


class RunWriter:
    """Writes records to one MLflow run: the flow's own, an attempt's child run, or a finished run found later."""

    def __init__(self, tracking_uri: str, run_id: str, pipeline: str, experiment_id: str = ""):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.uri, self.run_id, self.pipeline, self.experiment_id = tracking_uri, run_id, pipeline, experiment_id
        self.gate_failed = False

    @classmethod
    def start(cls, cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> RunWriter:
        """A new run in the config's experiment (made if missing), the whole config as its params."""
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        try:
            if cfg.tracking.uri.startswith("sqlite:///"):
                Path(cfg.tracking.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(
                    cfg.tracking.experiment, artifact_location=Path(cfg.tracking.artifact_location).resolve().as_uri()
                )
            )
        except Exception as exc:  # MLflow wraps a refused connection, a locked or unwritable store alike
            raise TrackingUnavailable(
                f"tracking.uri {redact(cfg.tracking.uri)}: the MLflow tracking store cannot be used "
                f"({error_line(exc)}); nothing was trained. Start the tracking server or fix tracking.uri, "
                "then run again."
            ) from exc
        run = client.create_run(experiment_id, run_name=run_name, tags=_redacted(tags))
        writer = cls(cfg.tracking.uri, run.info.run_id, cfg.name, experiment_id)
        writer.record(
            Record(
                params=flatten(cfg.model_dump(mode="json")),
                texts={"config/resolved.json": cfg.model_dump_json(indent=2)},
            )
        )
        return writer

    def child(self, run_name: str, item: Record | Recorded) -> RunWriter:
        """A child run (nested under this one in the UI), made with the record's tags, then given the rest of it."""
        record = _as_record(item)
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags=_redacted({"mlflow.parentRunId": self.run_id, **record.tags})
        )
        child = RunWriter(self.uri, run.info.run_id, self.pipeline, self.experiment_id)
        child.record(record.model_copy(update={"tags": {}}))
        return child

    def live_ref(self) -> MlflowRunRef:
        return MlflowRunRef(tracking_uri=self.uri, run_id=self.run_id)

    def record(self, *items: Record | Recorded) -> None:
        for item in items:
            self._write(_as_record(item))

    def _write(self, record: Record) -> None:
        params = [Param(key, redact(value)[:LONGEST_PARAM]) for key, value in record.params.items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_CALL])
        now = int(time.time() * 1000)
        missing = {point.name for point in record.backfill}
        missing = {name for name in missing if not self.client.get_metric_history(self.run_id, name)}
        metrics = [Metric(key, float(value), now, 0) for key, value in record.metrics.items() if value is not None]
        metrics += [Metric(point.name, point.value, now, point.step) for point in record.points]
        metrics += [
            Metric(point.name, point.value, now, point.step) for point in record.backfill if point.name in missing
        ]
        for start in range(0, len(metrics), METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_CALL])
        if record.tags:
            tags = [RunTag(key, value) for key, value in _redacted(record.tags).items()]
            self.client.log_batch(self.run_id, tags=tags)
        for artifact_file, text in record.texts.items():
            self.client.log_text(self.run_id, redact(text), artifact_file)
        for path, folder in record.files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), folder)
            else:
                self.client.log_artifact(self.run_id, str(path), folder)
        for artifact_file, columns in record.tables.items():
            self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)
        if record.datasets:
            self.client.log_inputs(self.run_id, [self._dataset_input(dataset) for dataset in record.datasets])
        if record.gate_failed is not None:
            self.gate_failed = record.gate_failed

    def _dataset_input(self, dataset: DatasetRecord):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        logged = Dataset(
            name=f"{self.pipeline}-{dataset.name}",
            digest=dataset.digest[:16],
            source_type="local",
            source=json.dumps({"uri": dataset.path.resolve().as_uri()}),
            profile=json.dumps(dataset.profile),
        )
        return DatasetInput(logged, [InputTag("mlflow.data.context", dataset.context)])

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def tracked_run(cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> Iterator[RunWriter]:
    """An MLflow run that ends FINISHED, or FAILED when the block raises (the error as a tag) or the gate failed."""
    writer = RunWriter.start(cfg, run_name, tags)
    with _ends(writer):
        yield writer


@contextlib.contextmanager
def tracked_child(parent: RunWriter, run_name: str, item: Record | Recorded) -> Iterator[RunWriter]:
    """A child run of `parent` (one training attempt); FAILED when the block raises or the gate failed."""
    child = parent.child(run_name, item)
    with _ends(child):
        yield child


@contextlib.contextmanager
def _ends(writer: RunWriter) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        writer.record(Record(tags={"error": f"{type(exc).__name__}: {exc}"[:5000]}))
        writer.end("FAILED")
        raise
    writer.end("FAILED" if writer.gate_failed else "FINISHED")


def open_store(cfg: TrackingConfig) -> None:
    """Open an existing SQLite tracking store ahead of the run, e.g. while Prefect's temporary server boots: MLflow
    keeps one store per URI and process, and opening it (the engine, the schema check) is what starting the run
    waits for otherwise. A store not there yet is left to the run, which makes it only once a stage runs (a run
    that fails before writes nothing); one that cannot be used is reported by `RunWriter.start`, not here."""
    if not (cfg.uri.startswith("sqlite:///") and Path(cfg.uri.removeprefix("sqlite:///")).is_file()):
        return
    with contextlib.suppress(Exception):
        MlflowClient(tracking_uri=cfg.uri).get_experiment_by_name(cfg.experiment)


def _as_record(item: Record | Recorded) -> Record:
    return item if isinstance(item, Record) else item.record()


def _redacted(tags: dict[str, str]) -> dict[str, str]:
    return {key: redact(value) for key, value in tags.items()}


def find_run_of_flow_run(cfg: TrackingConfig, flow_run_id: str) -> str | None:
    """The MLflow run a Prefect flow run logged to (tag `prefect.flow_run_id`), or None if it made none."""
    client = MlflowClient(tracking_uri=cfg.uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None
