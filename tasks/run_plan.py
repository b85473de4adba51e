"""`tunepipe check`: load, check and format the data exactly as a run would, and say what the run would do.

The stages run as plain functions (no Prefect server, no MLflow run, no model weights) into the same stage
folders the flow uses, so a check costs seconds and its outputs are what the run will read.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from tasks.base_model import BaseModelRef, resolve_base_model
from tasks.check_data import CheckedData, check_data
from tasks.config import PipelineConfig
from tasks.format_data import FormattedData, format_data
from tasks.load_data import data_fingerprint, load_data
from tasks.training import EnvironmentReport

# Going over the same rows more often than this mostly teaches the model to recite them.
MANY_EPOCHS = 50


class RunPlan(BaseModel):
    train_rows: int
    eval_rows: int
    train_tokens: int
    train_trained_tokens: int  # tokens that carry the loss (answers only, unless train.assistant_only_loss is off)
    eval_tokens: int
    longest_example_tokens: int
    examples_per_step: int  # train.batch_size × train.gradient_accumulation_steps × train.devices
    steps_per_epoch: int
    steps: int  # train.max_steps, or train.epochs over the training rows
    epochs: float  # how many times the steps go over the training rows
    environment: EnvironmentReport  # training's own check: device, precision, memory estimate against free memory
    warnings: list[str] = []  # what would not stop the run but is probably not what was meant


def plan_run(cfg: PipelineConfig, formatted: FormattedData, environment: EnvironmentReport) -> RunPlan:
    rows = formatted.train.n_rows
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.train.devices
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * rows / per_step)  # as the training loop counts
    epochs = steps * per_step / rows
    warnings = []
    if epochs > MANY_EPOCHS:
        setting = (f"train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps
                   else f"train.epochs={cfg.train.epochs}")
        warnings.append(f"{setting} goes over the {rows} training rows {epochs:.0f} times (more than {MANY_EPOCHS}): "
                        "the model will likely learn them by heart; use more rows or fewer steps")
    return RunPlan(
        train_rows=formatted.train.n_rows, eval_rows=formatted.eval.n_rows,
        train_tokens=formatted.train.n_tokens, train_trained_tokens=formatted.train.n_trained_tokens,
        eval_tokens=formatted.eval.n_tokens,
        longest_example_tokens=max(formatted.train.max_tokens, formatted.eval.max_tokens),
        examples_per_step=per_step, steps_per_epoch=max(1, math.ceil(rows / per_step)), steps=steps,
        epochs=epochs, environment=environment, warnings=warnings,
    )


def training_environment(cfg: PipelineConfig, base: BaseModelRef, formatted: FormattedData) -> EnvironmentReport:
    """Training's environment check on this machine, from the model's config alone (no weights are read).

    Raises TrainingEnvironmentError when the run would fail for want of a device or memory.
    """
    from tasks.train import TrainRequest
    from tasks.training import Rank, check_environment, choose_backend

    request = TrainRequest(data=formatted.train, base=base, model_cfg=cfg.model, lora=cfg.lora, cfg=cfg.train,
                           out_dir=cfg.workdir / "train")
    backend = choose_backend(cfg.train.backend, cfg.train.mode, cfg.train.devices)
    return check_environment(request, backend, Rank())


def check_run(cfg: PipelineConfig) -> tuple[CheckedData, RunPlan]:
    """Load, check and format the data, and check the training environment; raises DataFileError,
    DataCheckError or TrainingEnvironmentError when a run would fail."""
    base = resolve_base_model(cfg.model, cfg.ollama)
    loaded = load_data.fn(cfg.data, data_fingerprint(cfg.data), cfg.workdir)
    checked = check_data.fn(loaded, cfg.data, base, cfg.model, cfg.workdir)
    formatted = format_data.fn(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)
    return checked, plan_run(cfg, formatted, training_environment(cfg, base, formatted))
