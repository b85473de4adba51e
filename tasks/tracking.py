"""One MLflow run per pipeline run: config as params, stage metrics, artifacts, and links back to Prefect.

Logging happens in the flow from stage results, not inside the stages, so a run whose stages were all
cache hits still records everything those stages produced.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tasks.champion import MODEL_ARTIFACT
from tasks.config import PipelineConfig, TrackingConfig
from tasks.serve import PLAN_ARTIFACT, ServingPlan

if TYPE_CHECKING:
    from tasks.check_data import CheckedData
    from tasks.evaluate import EvalReport
    from tasks.export import ExportResult
    from tasks.format_data import FormattedData
    from tasks.gate import GateDecision
    from tasks.load_data import LoadedData
    from tasks.parity import ParityReport, ParityVerdict
    from tasks.train import TrainResult


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"max_steps": 20}} -> {"train.max_steps": "20"}: MLflow params are flat strings."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)}


class Tracker:
    def __init__(self, cfg: TrackingConfig):
        if cfg.uri.startswith("sqlite:///"):
            Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=cfg.uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(
                cfg.experiment, artifact_location=Path(cfg.artifact_location).resolve().as_uri()
            )
        )
        self.run_id = ""

    def start(self, cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        params = flatten(cfg.model_dump(mode="json"))
        # MLflow takes at most 100 params per call.
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.client.log_text(self.run_id, cfg.model_dump_json(indent=2), "config/resolved.json")
        return self.run_id

    def data_checked(self, loaded: LoadedData, checked: CheckedData) -> None:
        self._metrics({
            "data.rows_loaded_train": loaded.n_train, "data.rows_loaded_eval": loaded.n_eval,
            "data.rows_rejected_at_load": loaded.n_rejected,
            "data.rows_quarantined_train": checked.train.n_quarantined,
            "data.rows_quarantined_eval": checked.eval.n_quarantined,
            "data.rows_clean_train": checked.train.n_passed, "data.rows_clean_eval": checked.eval.n_passed,
        })
        for path in (loaded.quarantine_path, checked.train.quarantine_path, checked.eval.quarantine_path,
                     checked.train.report_html, checked.train.report_json, checked.eval.report_html,
                     checked.eval.report_json):
            self._artifact(path, "data_checks" if "report" in path.name else "quarantine")

    def trained(self, formatted: FormattedData, trained: TrainResult) -> None:
        self._metrics({
            "format.train_tokens": formatted.train.n_tokens,
            "format.train_trained_tokens": formatted.train.n_trained_tokens,
            "format.rows_too_long": formatted.n_quarantined,
            "train.runtime_s": trained.runtime_s, "train.trainable_params": trained.trainable_params,
        })
        now = _now_ms()
        history = [metric for point in trained.loss_history for metric in (
            Metric("train_loss", point.loss, now, point.step),
            Metric("learning_rate", point.learning_rate, now, point.step),
        )]
        for start in range(0, len(history), 1000):  # MLflow's per-call limit
            self.client.log_batch(self.run_id, metrics=history[start : start + 1000])
        self._artifact(formatted.quarantine_path, "quarantine")
        self._artifact(trained.adapter_dir, "adapter")
        self.tags({"train.backend": trained.backend})

    def evaluated(self, report: EvalReport, decision: GateDecision) -> None:
        for who, scores in (("candidate", report.candidate), ("base", report.base)):
            self._metrics({f"{who}.{name}": value for name, value in scores.model_dump().items()})
        self._artifact(report.samples_path, "eval")
        self.client.log_text(self.run_id, decision.model_dump_json(indent=2), "eval/gate.json")
        self.tags({"gate": "passed" if decision.passed else "failed", "gate.summary": decision.summary()})

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
            self.client.set_tag(self.run_id, key, value)

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
    """An MLflow run that ends FINISHED, or FAILED (with the error as a tag) when the block raises."""
    tracker = Tracker(cfg.tracking)
    tracker.start(cfg, run_name, tags)
    try:
        yield tracker
    except BaseException as exc:
        tracker.tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _now_ms() -> int:
    return int(time.time() * 1000)
