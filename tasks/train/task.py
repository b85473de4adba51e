"""The train stage: a thin task that trains in a worker process and reads the typed result back.

Training loads the model, CUDA state and (on a GPU) unsloth's patches; all of that belongs to the worker
(`tunepipe.tasks.train.loop.train_model`, started by `tunepipe.tasks.runtime.worker.run_worker`, under torchrun
for `train.devices` > 1), never to the flow's process or the next stage. The worker checkpoints into the
stage's folder, so a re-run after a kill resumes by itself; its live metrics reach the flow's MLflow run while it
trains.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from tunepipe.tasks.data.results import FormattedData, FormattedSplit
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.caching import StageCache, stage_dir
from tunepipe.tasks.runtime.config import LoraConfig, ModelConfig, TrackingConfig, TrainConfig
from tunepipe.tasks.runtime.gpu_slots import gpu_slots
from tunepipe.tasks.runtime.records import MlflowRunRef, Point, Record
from tunepipe.tasks.runtime.worker import EVALUATE_WORKER, prestart_worker, run_worker
from tunepipe.tasks.train.prestart import TRAIN_WORKER
from tunepipe.tasks.train.results import HeldOut, TrainResult, curve_points, eval_points


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


# The MLflow run only says where live metrics go; the training itself is in tasks/train/loop.py (the recipe)
# and the modules beside it that it runs, and the base model is read by tasks/model/base.py.
TRAIN_CACHE = StageCache(
    ignore=("mlflow_run",),
    sources=(
        "tunepipe.tasks.train.loop",
        "tunepipe.tasks.train.environment",
        "tunepipe.tasks.train.loading",
        "tunepipe.tasks.train.batching",
        "tunepipe.tasks.train.stepper",
        "tunepipe.tasks.train.selection",
        "tunepipe.tasks.train.checkpoints",
        "tunepipe.tasks.train.output",
        "tunepipe.tasks.train.progress",
        "tunepipe.tasks.train.preference",
        "tunepipe.tasks.train.head_loss",
        "tunepipe.tasks.train.data_parallel",
        "tunepipe.tasks.train.graphs",
        "tunepipe.tasks.train.recompute",
        "tunepipe.tasks.patches.unsloth",
        "tunepipe.tasks.patches.torch",
        "tunepipe.tasks.model.base",
        "tunepipe.tasks.model.packaged",
        "tunepipe.tasks.model.gguf_metadata",
        "tunepipe.tasks.model.gguf_tokenizer",
        "tunepipe.tasks.model.gguf_folder",
    ),
)


@task(name="train", cache_policy=TRAIN_CACHE, persist_result=True)
def train(
    data: FormattedData,
    base: BaseModelRef,
    model_cfg: ModelConfig,
    lora: LoraConfig,
    cfg: TrainConfig,
    workdir: Path,
    init_from: Path | None = None,
    held_out: HeldOut | None = None,
    mlflow_run: MlflowRunRef | None = None,
) -> TrainResult:
    """Train in a worker process; `mlflow_run` receives the live metrics (and is not part of the cache key).
    `held_out` is needed when `cfg.eval_steps` is set."""
    if bool(cfg.eval_steps) != (held_out is not None):  # given only when used: it is part of the cache key
        raise ValueError("the train stage takes held-out data exactly when train.eval_steps is set")
    out_dir = stage_dir(workdir, "train", data, base, model_cfg, lora, cfg, init_from, held_out)
    request = TrainRequest(
        data=data.train,
        base=base,
        model_cfg=model_cfg,
        lora=lora,
        cfg=cfg,
        out_dir=out_dir,
        init_from=init_from,
        held_out=held_out,
    )
    log = get_run_logger()
    prestart_worker(EVALUATE_WORKER)  # the evaluate stage follows: its worker imports while this one trains
    with gpu_slots(cfg.devices):  # inside the task, so a cache hit never waits for another run's training
        return run_worker(
            TRAIN_WORKER,
            request,
            TrainResult,
            out_dir,
            devices=cfg.devices,
            log=log,
            on_event=live_training_log(mlflow_run, log) if mlflow_run else None,
        )


def live_training_log(run: MlflowRunRef, log: logging.Logger) -> Callable[[dict], None]:
    """An `on_event` handler for the training worker: every logged step goes to MLflow as it happens."""
    from tunepipe.tasks.runtime.tracking import RunWriter

    writer = RunWriter(run.tracking_uri, run.run_id, pipeline="")

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            writer.record(Record(points=curve_points(event)))
            log.info(
                "step %d: loss %.4f, lr %.2e, grad norm %s, %s tokens/s",
                event["step"],
                event["loss"],
                event["learning_rate"],
                event.get("grad_norm"),
                event.get("tokens_per_s"),
            )
        elif event["event"] == "eval":
            writer.record(Record(points=eval_points(event)))
            log.info(
                "step %d: held-out loss %.4f%s%s",
                event["step"],
                event["eval_loss"],
                "".join(f", {name} {value:.4g}" for name, value in event["metrics"].items() if "." not in name),
                f" (peak GPU memory so far {event['peak_gpu_memory_gib']} GiB)"
                if event.get("peak_gpu_memory_gib") is not None
                else "",
            )
        elif event["event"] == "started":  # what the environment check decided, beside the run's params
            writer.record(
                Record(
                    tags={
                        f"train.environment.{key}": str(event[key])
                        for key in (
                            "backend",
                            "device",
                            "precision",
                            "gradient_checkpointing",
                            "estimate_gib",
                            "free_gib",
                        )
                    }
                )
            )
        elif event["event"] == "oom_retry":
            log.warning("%s", event["message"])
            writer.record(
                Record(
                    points=[
                        Point(name="train.oom_retries", value=event["retries"], step=event["step"]),
                        Point(name="train.micro_batch_size", value=event["micro_batch_size"], step=event["step"]),
                    ],
                    tags={"train.oom": event["message"]},
                )
            )

    return on_event


def trained_model(cfg: TrackingConfig, registered_name: str, model: str, dest: Path) -> tuple[str, TrainResult]:
    """The run id of a finished run, and what its train stage returned with the model fetched once into `dest`.

    `model` is that MLflow run's id, or `v<N>` for version N of the registered model. A LoRA run's adapter is
    an artifact of the run. A full fine-tune's weights are the run's `model` artifact once it was exported;
    before that (the gate failed) they are only in the train stage's folder, used while it exists.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from tunepipe.tasks.integrations.model_registry import MODEL_ARTIFACT

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
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(partial), tracking_uri=cfg.uri
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            Path(local).rename(target)
        return target

    if artifact == "adapter" or "export.merged_dir" in run.data.tags:  # the run logged the whole folder
        local = fetch(artifact)
        trained = TrainResult.model_validate_json((local / "train_result.json").read_text())
        return run_id, trained.model_copy(update={"adapter_dir": local})
    trained = TrainResult.model_validate_json(fetch(f"{artifact}/train_result.json").read_text())
    if not (trained.adapter_dir / "config.json").is_file():
        raise ValueError(
            f"run {run_id} trained every weight (train.mode: full) and was not exported, so MLflow "
            f"holds no weights of it, and its train stage folder {trained.adapter_dir} is gone"
        )
    return run_id, trained
