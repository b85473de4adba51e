"""The train stage: a thin task that trains in a worker process and reads the typed result back.

Training loads the model, CUDA state and (on a GPU) unsloth's patches; all of that belongs to the worker
(`tasks.train.loop.train_model`, started by `tasks.runtime.worker.run_worker`, under torchrun for `train.devices` > 1),
never to the flow's process or the next stage. The worker checkpoints into the stage's folder, so a re-run
after a kill resumes by itself; its live metrics reach the flow's MLflow run while it trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import get_run_logger, task
from pydantic import BaseModel

from tasks.model.base import BaseModelRef
from tasks.runtime.caching import StageCache, stage_dir
from tasks.runtime.config import LoraConfig, ModelConfig, TrainConfig
from tasks.data.format import FormattedData, FormattedSplit
from tasks.runtime.gpu_slots import gpu_slots
from tasks.runtime.worker import run_worker

if TYPE_CHECKING:  # the worker imports this module, and needs neither MLflow nor its start-up time
    from tasks.runtime.tracking import MlflowRunRef

Backend = Literal["hf", "unsloth"]


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
    from tasks.runtime.tracking import live_training_log

    log = get_run_logger()
    with gpu_slots(cfg.devices):  # inside the task, so a cache hit never waits for another run's training
        return run_worker("tasks.train.loop:train_model", request, TrainResult, out_dir, devices=cfg.devices,
                          log=log, on_event=live_training_log(mlflow_run, log) if mlflow_run else None)
