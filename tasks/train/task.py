"""The train stage: a thin task that trains in a worker process and reads the typed result back.

Training loads the model, CUDA state and (on a GPU) unsloth's patches; all of that belongs to the worker
(`tasks.train.loop.train_model`, started by `tasks.runtime.worker.run_worker`, under torchrun for `train.devices` > 1),
never to the flow's process or the next stage. The worker checkpoints into the stage's folder, so a re-run
after a kill resumes by itself; its live metrics reach the flow's MLflow run while it trains.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from pydantic import BaseModel

from tasks.model.base import BaseModelRef
from tasks.runtime.caching import StageCache, stage_dir
from tasks.runtime.config import LoraConfig, ModelConfig, TrackingConfig, TrainConfig
from tasks.data.results import FormattedData, FormattedSplit
from tasks.runtime.gpu_slots import gpu_slots
from tasks.runtime.records import MlflowRunRef, Point, Record
from tasks.runtime.worker import run_worker

Backend = Literal["hf", "unsloth"]
# Per logged training step: MLflow metric name <- LossPoint field.
TRAINING_CURVE = {"train_loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
                  "tokens_per_s": "tokens_per_s", "peak_gpu_memory_gib": "peak_gpu_memory_gib",
                  "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                  "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy", "kl": "kl"}


class LossPoint(BaseModel):
    step: int
    loss: float  # mean over the step's loss tokens
    learning_rate: float
    grad_norm: float | None = None  # before clipping
    tokens_per_s: float | None = None  # non-padding tokens, all devices, since the previous logged step
    peak_gpu_memory_gib: float | None = None  # None on the CPU
    elapsed_s: float  # since training started: step times without model loading
    # Preference steps (issue 22): `loss` is the KTO or DPO loss; the rewards are beta x (policy - reference)
    # log-probabilities of the answers, as TRL logs them.
    phase: Literal["sft", "kto", "dpo"] = "sft"
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    rewards_margin: float | None = None
    rewards_accuracy: float | None = None  # DPO: share of pairs whose chosen answer has the larger reward
    kl: float | None = None  # KTO: the batch's estimate of KL(policy || reference), clamped at 0


class EvalPoint(BaseModel):
    """One held-out evaluation during training (train.eval_steps)."""

    step: int  # 0: the weights an attempt continues from, before its first step
    eval_loss: float  # mean over the eval split's answer tokens, as the evaluate stage measures it
    metrics: dict[str, float] = {}  # answer metrics (tasks/evaluate/metrics.py) on the sampled prompts; empty for eval_loss
    elapsed_s: float  # the evaluation's own wall time


class HeldOut(BaseModel):
    """What the evaluations during training measure, and what the best checkpoint is chosen by."""

    loss_rows: FormattedSplit  # the formatted eval split: the held-out loss
    examples: Path  # the clean eval examples: prompts to answer and the expected answers
    train_examples: Path  # the clean train examples: the keys a JSON answer must carry, as the evaluation reads them
    metric: str  # retrain.metric: `eval_loss`, or an answer metric measured on `train.eval_samples` prompts
    output_format: Literal["json", "text"]
    max_new_tokens: int
    batch_size: int


class TrainResult(BaseModel):
    adapter_dir: Path  # kind "lora": PEFT adapter + tokenizer; kind "full": the whole model + tokenizer
    kind: Literal["lora", "full"]
    backend: Backend
    loss_history: list[LossPoint]
    runtime_s: float
    trainable_params: int
    total_params: int
    steps: int
    device: str  # e.g. "cuda (NVIDIA H100 80GB HBM3) x1", "cpu x2"
    precision: str
    micro_batch_size: int  # after out-of-memory retries, if any
    gradient_accumulation_steps: int
    oom_retries: int
    resumed_from_step: int  # 0 for a run that started from scratch
    eval_history: list[EvalPoint] = []  # train.eval_steps
    best_step: int | None = None  # the best evaluation's step (whichever train.select returned)
    selected_step: int | None = None  # the step whose weights `adapter_dir` holds; None: the last (no selection)
    selection: str = ""  # why those weights, in words (the MLflow tag `train.selection`)
    stopped_early: bool = False  # train.early_stopping ended training before max_steps

    def curve(self) -> Record:
        """How training went: each attempt's run shows it. A stage that ran reported its curve live; a cached
        one did not, so the curve is also here, for the runs that lack it."""
        return Record(
            metrics={"train.runtime_s": self.runtime_s, "train.trainable_params": self.trainable_params,
                     "train.oom_retries": self.oom_retries, "train.micro_batch_size": self.micro_batch_size,
                     "train.gradient_accumulation_steps": self.gradient_accumulation_steps},
            backfill=[p for point in self.loss_history for p in curve_points(point.model_dump())]
            + [p for point in self.eval_history for p in eval_points(point.model_dump())],
            tags={"train.backend": self.backend, "train.kind": self.kind, "train.device": self.device,
                  "train.precision": self.precision, "train.selection": self.selection,
                  "train.selected_step": "" if self.selected_step is None else str(self.selected_step),
                  "train.stopped_early": str(self.stopped_early).lower()},
        )

    def record(self) -> Record:
        """The curve, and the trained weights with this result beside them, so the evaluate flow can score
        the run's model later (`trained_model`)."""
        from tasks.serve.champion import MODEL_ARTIFACT

        if self.kind == "lora":
            files, folder = [(self.adapter_dir, "adapter")], "adapter"
        else:  # the weights of a whole model are logged by export (the `model` artifact); its config says which
            files, folder = [(self.adapter_dir / "config.json", MODEL_ARTIFACT)], MODEL_ARTIFACT
        return self.curve() + Record(files=files, texts={f"{folder}/train_result.json": self.model_dump_json(indent=2)})


class TrainRequest(BaseModel):
    """Everything the worker needs; written as JSON into the stage's folder."""

    data: FormattedSplit
    base: BaseModelRef
    model_cfg: ModelConfig
    lora: LoraConfig
    cfg: TrainConfig
    out_dir: Path
    init_from: Path | None = None  # an earlier TrainResult.adapter_dir whose weights to start from
    held_out: HeldOut | None = None  # given when train.eval_steps is set


# The MLflow run only says where live metrics go; the training itself is in tasks/train/loop.py.
TRAIN_CACHE = StageCache(ignore=("mlflow_run",), sources=("tasks.train.loop", "tasks.train.preference"))


@task(name="train", cache_policy=TRAIN_CACHE, persist_result=True)
def train(
    data: FormattedData, base: BaseModelRef, model_cfg: ModelConfig, lora: LoraConfig, cfg: TrainConfig,
    workdir: Path, init_from: Path | None = None, held_out: HeldOut | None = None,
    mlflow_run: MlflowRunRef | None = None,
) -> TrainResult:
    """Train in a worker process; `mlflow_run` receives the live metrics (and is not part of the cache key).
    `held_out` is needed when `cfg.eval_steps` is set."""
    if bool(cfg.eval_steps) != (held_out is not None):  # given only when used: it is part of the cache key
        raise ValueError("the train stage takes held-out data exactly when train.eval_steps is set")
    out_dir = stage_dir(workdir, "train", data, base, model_cfg, lora, cfg, init_from, held_out)
    request = TrainRequest(data=data.train, base=base, model_cfg=model_cfg, lora=lora, cfg=cfg, out_dir=out_dir,
                           init_from=init_from, held_out=held_out)
    log = get_run_logger()
    with gpu_slots(cfg.devices):  # inside the task, so a cache hit never waits for another run's training
        return run_worker("tasks.train.loop:train_model", request, TrainResult, out_dir, devices=cfg.devices,
                          log=log, on_event=live_training_log(mlflow_run, log) if mlflow_run else None)


def curve_points(values: dict) -> list[Point]:
    """A logged training step (a LossPoint, or the worker's `step` event) as MLflow metrics at its step."""
    curve = dict(TRAINING_CURVE)
    if values.get("phase", "sft") != "sft":  # a KTO or DPO loss is another quantity than SFT's token loss
        curve[f"train_{values['phase']}_loss"] = curve.pop("train_loss")
    return [Point(name=name, value=float(values[field]), step=values["step"])
            for name, field in curve.items() if values.get(field) is not None]


def eval_points(values: dict) -> list[Point]:
    """A held-out evaluation during training: `eval_loss` and `eval_<metric>` at its step."""
    return [Point(name="eval_loss", value=float(values["eval_loss"]), step=values["step"]),
            *(Point(name=f"eval_{name}", value=float(value), step=values["step"])
              for name, value in values["metrics"].items())]


def live_training_log(run: MlflowRunRef, log: logging.Logger) -> Callable[[dict], None]:
    """An `on_event` handler for the training worker: every logged step goes to MLflow as it happens."""
    from tasks.runtime.tracking import RunWriter

    writer = RunWriter(run.tracking_uri, run.run_id, pipeline="")

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            writer.record(Record(points=curve_points(event)))
            log.info("step %d: loss %.4f, lr %.2e, grad norm %s, %s tokens/s", event["step"], event["loss"],
                     event["learning_rate"], event.get("grad_norm"), event.get("tokens_per_s"))
        elif event["event"] == "eval":
            writer.record(Record(points=eval_points(event)))
            log.info("step %d: held-out loss %.4f%s", event["step"], event["eval_loss"],
                     "".join(f", {name} {value:.4g}" for name, value in event["metrics"].items() if "." not in name))
        elif event["event"] == "started":  # what the environment check decided, beside the run's params
            writer.record(Record(tags={
                f"train.environment.{key}": str(event[key])
                for key in ("backend", "device", "precision", "gradient_checkpointing", "estimate_gib", "free_gib")
            }))
        elif event["event"] == "oom_retry":
            log.warning("%s", event["message"])
            writer.record(Record(points=[
                Point(name="train.oom_retries", value=event["retries"], step=event["step"]),
                Point(name="train.micro_batch_size", value=event["micro_batch_size"], step=event["step"]),
            ], tags={"train.oom": event["message"]}))

    return on_event


def trained_model(cfg: TrackingConfig, registered_name: str, model: str, dest: Path) -> tuple[str, TrainResult]:
    """The run id of a finished run, and what its train stage returned with the model fetched once into `dest`.

    `model` is that MLflow run's id, or `v<N>` for version N of the registered model. A LoRA run's adapter is
    an artifact of the run. A full fine-tune's weights are the run's `model` artifact once it was exported;
    before that (the gate failed) they are only in the train stage's folder, used while it exists.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from tasks.serve.champion import MODEL_ARTIFACT

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
