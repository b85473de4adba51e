"""One MLflow run per pipeline run: config as params, stage metrics, artifacts, and links back to Prefect.

Params, tags and the resolved config go through `redact`: a tracking URI or token in the config never
reaches the store.

Logging happens in the flow from stage results, not inside the stages, so a run whose stages were all
cache hits still records everything those stages produced.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.serve.champion import MODEL_ARTIFACT
from tasks.runtime.config import PipelineConfig, TrackingConfig
from tasks.serve.ollama.client import file_digest
from tasks.runtime.redact import error_line, redact
from tasks.serve.task import PLAN_ARTIFACT, ServingPlan

if TYPE_CHECKING:
    from tasks.data.check import CheckedData
    from tasks.evaluate.task import EvalReport
    from tasks.export.task import ExportResult
    from tasks.data.format import FormattedData
    from tasks.evaluate.gate import GateDecision
    from tasks.data.load import LoadedData
    from tasks.export.parity import ParityReport, ParityVerdict
    from tasks.evaluate.report import RunReport
    from tasks.evaluate.retrain_plan import AttemptPlan
    from tasks.train.task import EvalPoint, LossPoint, TrainResult

# Per logged training step: MLflow metric name <- LossPoint field.
TRAINING_CURVE = {"train_loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
                  "tokens_per_s": "tokens_per_s", "peak_gpu_memory_gib": "peak_gpu_memory_gib",
                  "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                  "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy", "kl": "kl"}


class MlflowRunRef(BaseModel):
    """Where a stage may report live progress: the flow's MLflow run."""

    tracking_uri: str
    run_id: str


def curve_metrics(point: LossPoint | dict, timestamp_ms: int) -> list[Metric]:
    values = point if isinstance(point, dict) else point.model_dump()
    curve = dict(TRAINING_CURVE)
    if values.get("phase", "sft") != "sft":  # a KTO or DPO loss is another quantity than SFT's token loss
        curve[f"train_{values['phase']}_loss"] = curve.pop("train_loss")
    return [Metric(name, float(values[field]), timestamp_ms, values["step"])
            for name, field in curve.items() if values.get(field) is not None]


def eval_curve_metrics(point: EvalPoint | dict, timestamp_ms: int) -> list[Metric]:
    """A held-out evaluation during training: `eval_loss` and `eval_<metric>` at its step."""
    values = point if isinstance(point, dict) else point.model_dump()
    return [Metric("eval_loss", float(values["eval_loss"]), timestamp_ms, values["step"]),
            *(Metric(f"eval_{name}", float(value), timestamp_ms, values["step"])
              for name, value in values["metrics"].items())]


def live_training_log(run: MlflowRunRef, log: logging.Logger) -> Callable[[dict], None]:
    """An `on_event` handler for the training worker: every logged step goes to MLflow as it happens."""
    client = MlflowClient(tracking_uri=run.tracking_uri)

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            client.log_batch(run.run_id, metrics=curve_metrics(event, _now_ms()))
            log.info("step %d: loss %.4f, lr %.2e, grad norm %s, %s tokens/s", event["step"], event["loss"],
                     event["learning_rate"], event.get("grad_norm"), event.get("tokens_per_s"))
        elif event["event"] == "eval":
            client.log_batch(run.run_id, metrics=eval_curve_metrics(event, _now_ms()))
            log.info("step %d: held-out loss %.4f%s", event["step"], event["eval_loss"],
                     "".join(f", {name} {value:.4g}" for name, value in event["metrics"].items() if "." not in name))
        elif event["event"] == "started":  # what the environment check decided, beside the run's params
            client.log_batch(run.run_id, tags=[
                RunTag(f"train.environment.{key}", str(event[key]))
                for key in ("backend", "device", "precision", "gradient_checkpointing", "estimate_gib", "free_gib")
            ])
        elif event["event"] == "oom_retry":
            log.warning("%s", event["message"])
            client.log_batch(run.run_id, metrics=[
                Metric("train.oom_retries", event["retries"], _now_ms(), event["step"]),
                Metric("train.micro_batch_size", event["micro_batch_size"], _now_ms(), event["step"]),
            ])
            client.set_tag(run.run_id, "train.oom", event["message"])

    return on_event


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"max_steps": 20}} -> {"train.max_steps": "20"}: MLflow params are flat strings."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used; raised before any stage runs, so nothing was trained."""


class Tracker:
    def __init__(self, cfg: TrackingConfig):
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.uri = cfg.uri
        try:
            if cfg.uri.startswith("sqlite:///"):
                Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(
                    cfg.experiment, artifact_location=Path(cfg.artifact_location).resolve().as_uri()
                )
            )
        except Exception as exc:  # MLflow wraps a refused connection, a locked or unwritable store alike
            raise TrackingUnavailable(
                f"tracking.uri {redact(cfg.uri)}: the MLflow tracking store cannot be used ({error_line(exc)}); "
                "nothing was trained. Start the tracking server or fix tracking.uri, then run again."
            ) from exc
        self.run_id = self.name = ""
        self.gate_failed = False

    def start(self, cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={key: redact(value) for key, value in tags.items()})
        self.run_id, self.name = run.info.run_id, cfg.name
        params = flatten(cfg.model_dump(mode="json"))
        # MLflow takes at most 100 params per call.
        items = [Param(key, redact(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.client.log_text(self.run_id, redact(cfg.model_dump_json(indent=2)), "config/resolved.json")
        return self.run_id

    def data_checked(self, loaded: LoadedData, checked: CheckedData) -> None:
        self._metrics({
            "data.rows_loaded_train": loaded.n_train, "data.rows_loaded_eval": loaded.n_eval,
            "data.rows_rejected_at_load": loaded.n_rejected,
            "data.rows_quarantined_train": checked.train.n_quarantined,
            "data.rows_quarantined_eval": checked.eval.n_quarantined,
            "data.rows_clean_train": checked.train.n_passed, "data.rows_clean_eval": checked.eval.n_passed,
            "data.rows_read": checked.rows_read, "data.rows_quarantined": checked.rows_quarantined,
        })
        self._artifact(checked.quarantine_path, "quarantine")
        self._artifact(checked.summary_path, "data_checks")
        self._artifact(checked.data_docs.parent, "data_checks/data_docs")
        self.tags({"data.checks": "passed" if not checked.problems else "failed"})
        # The rows the run trains and is judged on, as MLflow dataset inputs ("Datasets" in the UI): each split's
        # own digest, and the fingerprint of the whole data set (the `dataset.fingerprint` tag) in its profile.
        splits = (("train", checked.train, "training"), ("eval", checked.eval, "evaluation"))
        self.client.log_inputs(self.run_id, [
            dataset_input(f"{self.name}-{split}", file_digest(report.clean_path).removeprefix("sha256:"),
                          report.clean_path, context, {
                              "num_rows": report.n_passed, "fingerprint": loaded.fingerprint,
                              "rows_by_file": {f.source: getattr(f, f"kept_{split}") for f in checked.files}})
            for split, report, context in splits
        ])

    def live_ref(self) -> MlflowRunRef:
        return MlflowRunRef(tracking_uri=self.uri, run_id=self.run_id)

    def trained(self, formatted: FormattedData, trained: TrainResult) -> None:
        self._metrics({
            "format.train_tokens": formatted.train.n_tokens,
            "format.train_trained_tokens": formatted.train.n_trained_tokens,
            "format.rows_too_long": formatted.n_quarantined,
        })
        self._training(trained)
        self._artifact(formatted.quarantine_path, "quarantine")
        if trained.kind == "lora":
            self._artifact(trained.adapter_dir, "adapter")
            folder = "adapter"
        else:  # the weights of a whole model are logged by export (the `model` artifact); its config says which
            self._artifact(trained.adapter_dir / "config.json", MODEL_ARTIFACT)
            folder = MODEL_ARTIFACT
        # What the train stage returned, so the evaluate flow can score this run's model later.
        self.client.log_text(self.run_id, trained.model_dump_json(indent=2), f"{folder}/train_result.json")

    def attempt(self, plan: AttemptPlan, run_name: str) -> Tracker:
        """A child run for one training attempt, with the settings it trained with."""
        child = copy.copy(self)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.run_id, "retrain.attempt": str(plan.number),
            "retrain.init_from": str(plan.init_from or ""), "retrain.reason": plan.reason or "",
        })
        child.run_id = run.info.run_id
        params = flatten({"train": plan.train.model_dump(mode="json"), "lora": plan.lora.model_dump(mode="json"),
                          "change": plan.change.model_dump(mode="json", exclude_defaults=True) if plan.change else {}})
        self.client.log_batch(child.run_id, params=[Param(k, redact(v)[:6000]) for k, v in params.items()])
        return child

    def attempted(self, trained: TrainResult, report: EvalReport, decision: GateDecision) -> None:
        """An attempt's own record: its loss curve, the three models' scores and its gate decision."""
        self._training(trained)
        self._scores(report)
        self._decision(decision)

    def evaluated(self, report: EvalReport, decision: GateDecision) -> None:
        self._scores(report)
        self._artifact(report.samples_path, "eval")
        self._artifact(report.probes_path, "eval")
        if report.undesirable_path is not None:
            self._artifact(report.undesirable_path, "eval")
        self.client.log_table(self.run_id, data=per_example_table(report.samples_path),
                              artifact_file="eval/examples.json")
        probes = [json.loads(line) for line in report.probes_path.read_text().splitlines() if line.strip()]
        if probes:
            self.client.log_table(self.run_id, data={column: [probe.get(column) for probe in probes] for column in (
                "prompt", "base", "champion", "candidate")}, artifact_file="eval/probes.json")
        self._decision(decision)

    def retrained(self, n_attempts: int, outcome: str) -> None:
        self._metrics({"retrain.attempts": n_attempts})
        self.tags({"retrain.outcome": outcome})

    def reported(self, report: RunReport) -> None:
        self._artifact(report.folder, "report")

    def _training(self, trained: TrainResult) -> None:
        self._metrics({
            "train.runtime_s": trained.runtime_s, "train.trainable_params": trained.trainable_params,
            "train.oom_retries": trained.oom_retries, "train.micro_batch_size": trained.micro_batch_size,
            "train.gradient_accumulation_steps": trained.gradient_accumulation_steps,
        })
        # A stage that ran reported its curve live; a cached one did not, so this run gets it from the result.
        now = _now_ms()
        history = []
        if not self.client.get_metric_history(self.run_id, "train_loss"):
            history += [metric for point in trained.loss_history for metric in curve_metrics(point, now)]
        if not self.client.get_metric_history(self.run_id, "eval_loss"):
            history += [metric for point in trained.eval_history for metric in eval_curve_metrics(point, now)]
        for start in range(0, len(history), 1000):  # MLflow's per-call limit
            self.client.log_batch(self.run_id, metrics=history[start : start + 1000])
        self.tags({"train.backend": trained.backend, "train.kind": trained.kind, "train.device": trained.device,
                   "train.precision": trained.precision, "train.selection": trained.selection,
                   "train.selected_step": "" if trained.selected_step is None else str(trained.selected_step),
                   "train.stopped_early": str(trained.stopped_early).lower()})

    def _scores(self, report: EvalReport) -> None:
        for scores in (report.candidate, report.base, report.champion):
            if scores is not None:
                self._metrics({f"{scores.name}.{name}": value for name, value in scores.metrics.items()})
        if report.champion is not None:
            self.tags({"champion.version": report.champion.version or ""})

    def _decision(self, decision: GateDecision) -> None:
        self.gate_failed = not decision.passed
        self.client.log_text(self.run_id, decision.model_dump_json(indent=2), "eval/gate.json")
        self.tags({"gate": "passed" if decision.passed else "failed", "gate.summary": decision.summary()[:5000],
                   "gate.reasons": "\n".join(decision.reasons)[:5000]})

    def exported(self, exported: ExportResult, parity: ParityReport, verdicts: list[ParityVerdict]) -> None:
        """GGUF sizes and per-type parity scores; the merged model as the `model` artifact the registry points at."""
        self._metrics({f"export.{gguf.type}.bytes": gguf.bytes for gguf in exported.ggufs})
        self._metrics({f"parity.{scores.gguf_type}.{name}": value
                       for scores in parity.ggufs for name, value in scores.scores.items()})
        self._artifact(parity.samples_path, "parity")
        self.client.log_text(self.run_id, json.dumps([v.model_dump() for v in verdicts], indent=2),
                             "parity/verdicts.json")
        self._artifact(exported.merged_dir, MODEL_ARTIFACT)
        self.tags({"export.merged_dir": str(exported.merged_dir),
                   "parity.passed": ",".join(v.gguf_type for v in verdicts if v.passed) or "none"})

    def planned(self, plan: ServingPlan) -> None:
        self._artifact(plan.modelfile, "ollama")
        self.client.log_text(self.run_id, plan.model_dump_json(indent=2), PLAN_ARTIFACT)
        self.tags({"export.gguf_path": str(plan.gguf.path), "gguf.type": plan.gguf.type,
                   "ollama.model": plan.ollama.model_name})

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, redact(value))

    def _metrics(self, values: dict[str, float | None]) -> None:
        now = _now_ms()
        batch = [Metric(key, float(value), now, 0) for key, value in values.items() if value is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def _artifact(self, path: Path, folder: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def tracked_run(cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> Iterator[Tracker]:
    """An MLflow run that ends FINISHED, or FAILED when the block raises (the error as a tag) or the gate failed."""
    tracker = Tracker(cfg.tracking)
    tracker.start(cfg, run_name, tags)
    with _ends(tracker):
        yield tracker


@contextlib.contextmanager
def tracked_attempt(parent: Tracker, plan: AttemptPlan) -> Iterator[Tracker]:
    """A child run of `parent` for one training attempt; FAILED when the attempt raises or fails the gate."""
    child = parent.attempt(plan, run_name=f"attempt-{plan.number}")
    with _ends(child):
        yield child


@contextlib.contextmanager
def _ends(tracker: Tracker) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        tracker.tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end("FAILED")
        raise
    tracker.end("FAILED" if tracker.gate_failed else "FINISHED")


def per_example_table(samples_path: Path) -> dict[str, list]:
    """The per-example JSONL as columns: id, source, prompt, expected, then answer, stopped and each score per model."""
    rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    models = [who for who in ("base", "champion", "candidate") if rows and who in rows[0]]
    scores = {who: sorted({name for row in rows for name in row[who]["scores"]}) for who in models}
    columns = [("id", lambda row: row["id"]), ("source", lambda row: row["source"]),
               ("prompt", lambda row: row["prompt"]), ("expected", lambda row: row["expected"])]
    for who in models:
        columns += [(f"{who}.answer", lambda row, who=who: row[who]["answer"]),
                    (f"{who}.stopped", lambda row, who=who: row[who]["stopped"])]
        columns += [(f"{who}.{name}", lambda row, who=who, name=name: row[who]["scores"].get(name))
                    for name in scores[who]]
    return {name: [value(row) for row in rows] for name, value in columns}


def _now_ms() -> int:
    return int(time.time() * 1000)


def find_run_of_flow_run(cfg: TrackingConfig, flow_run_id: str) -> str | None:
    """The MLflow run a Prefect flow run logged to (tag `prefect.flow_run_id`), or None if it made none."""
    client = MlflowClient(tracking_uri=cfg.uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def dataset_input(name: str, digest: str, path: Path, context: str, profile: dict[str, Any]):
    """An MLflow dataset input: a local file, `digest` (MLflow keeps 36 characters: we give 16) and a profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:16], source_type="local",
                      source=json.dumps({"uri": path.resolve().as_uri()}), profile=json.dumps(profile))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


def log_dataset_input(cfg: TrackingConfig, run_id: str, name: str, fingerprint: str, train_file: Path,
                      rows_by_source: dict[str, int], files: list[Path]) -> None:
    """Record a versioned training set as the run's input (MLflow's dataset tracking), with its files."""
    client = MlflowClient(tracking_uri=cfg.uri)
    # The full fingerprint is in the profile.
    client.log_inputs(run_id, [dataset_input(name, fingerprint, train_file, "training", {
        "num_rows": sum(rows_by_source.values()), "rows_by_source": rows_by_source, "fingerprint": fingerprint})])
    for source, rows in rows_by_source.items():
        client.set_tag(run_id, f"dataset.rows.{source}", str(rows))
    for path in files:
        client.log_artifact(run_id, str(path), "dataset")


def trained_model(cfg: TrackingConfig, registered_name: str, model: str, dest: Path) -> tuple[str, TrainResult]:
    """The run id of a finished run, and what its train stage returned with the model fetched once into `dest`.

    `model` is that MLflow run's id, or `v<N>` for version N of the registered model. A LoRA run's adapter is
    an artifact of the run. A full fine-tune's weights are the run's `model` artifact once it was exported;
    before that (the gate failed) they are only in the train stage's folder, used while it exists.
    """
    import mlflow.artifacts

    from tasks.train.task import TrainResult

    client = MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)
    version = re.fullmatch(r"v(\d+)", model)
    run_id = client.get_model_version(registered_name, version[1]).run_id if version else model
    run = client.get_run(run_id)
    folder = dest / run_id
    artifact = "adapter" if run.data.tags.get("train.kind", "lora") == "lora" else MODEL_ARTIFACT

    def fetch(path: str) -> Path:  # once: downloaded under a temporary name, so a path that exists is complete
        target = folder / path
        if not target.exists():
            partial = folder / ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(partial),
                                                        tracking_uri=cfg.uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            Path(local).rename(target)
        return target

    if artifact == "adapter" or "export.merged_dir" in run.data.tags:  # the run logged the whole folder
        local = fetch(artifact)
        trained = TrainResult.model_validate_json((local / "train_result.json").read_text())
        return run_id, trained.model_copy(update={"adapter_dir": local})
    trained = TrainResult.model_validate_json(fetch(f"{artifact}/train_result.json").read_text())
    if not (trained.adapter_dir / "config.json").is_file():
        raise ValueError(f"run {run_id} trained every weight (train.mode: full) and was not exported, so MLflow "
                         f"holds no weights of it, and its train stage folder {trained.adapter_dir} is gone")
    return run_id, trained
