"""`tunepipe check`: load, check and format the data exactly as a run would, and say what the run would do.

The stages run as plain functions (no Prefect server, no MLflow run, no model weights) into the same stage
folders the flow uses, so a check costs seconds and its outputs are what the run will read.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from tasks.base_model import resolve_base_model
from tasks.check_data import CheckedData, check_data
from tasks.config import PipelineConfig
from tasks.format_data import FormattedData, format_data
from tasks.load_data import data_fingerprint, load_data


class RunPlan(BaseModel):
    train_rows: int
    eval_rows: int
    train_tokens: int
    train_trained_tokens: int  # tokens that carry the loss (answers only, unless train.assistant_only_loss is off)
    eval_tokens: int
    longest_example_tokens: int
    examples_per_step: int  # train.batch_size × train.gradient_accumulation_steps
    steps_per_epoch: int
    max_steps: int
    epochs: float  # how many times train.max_steps goes over the training rows


def plan_run(cfg: PipelineConfig, formatted: FormattedData) -> RunPlan:
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(formatted.train.n_rows / per_step))
    return RunPlan(
        train_rows=formatted.train.n_rows, eval_rows=formatted.eval.n_rows,
        train_tokens=formatted.train.n_tokens, train_trained_tokens=formatted.train.n_trained_tokens,
        eval_tokens=formatted.eval.n_tokens,
        longest_example_tokens=max(formatted.train.max_tokens, formatted.eval.max_tokens),
        examples_per_step=per_step, steps_per_epoch=steps_per_epoch, max_steps=cfg.train.max_steps,
        epochs=cfg.train.max_steps / steps_per_epoch,
    )


def check_run(cfg: PipelineConfig) -> tuple[CheckedData, RunPlan]:
    """Load, check and format the data; raises DataFileError or DataCheckError when a run would fail."""
    base = resolve_base_model(cfg.model)
    loaded = load_data.fn(cfg.data, data_fingerprint(cfg.data), cfg.workdir)
    checked = check_data.fn(loaded, cfg.data, base, cfg.model, cfg.workdir)
    formatted = format_data.fn(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)
    return checked, plan_run(cfg, formatted)
