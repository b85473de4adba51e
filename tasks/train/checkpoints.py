"""Checkpoints and the run's output.

Rank 0 writes `step-N` (the trainable weights, optimizer, scheduler, scaler, RNG and `TrainingState`) under a
temporary name and renames it, so a folder of that name is complete; `resume` loads the newest and the run goes
on to the same result as an uninterrupted one. The best evaluation's trainable weights stay beside it in
`best-M`. The stage's output (the adapter, or the full model) supersedes them all.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from tunepipe.tasks.runtime.worker import emit_event
from tunepipe.tasks.train.environment import EnvironmentReport, Rank, barrier
from tunepipe.tasks.train.results import EvalPoint, LossPoint, TrainResult
from tunepipe.tasks.train.task import TrainRequest

if TYPE_CHECKING:
    from tunepipe.tasks.train.selection import Choice
    from tunepipe.tasks.train.stepper import Stepper

CHECKPOINT = re.compile(r"step-(\d+)")
BEST = "best-{step:07d}"  # the best evaluation's trainable weights, beside the newest checkpoint


class TrainingState(BaseModel):
    """What a checkpoint carries besides tensors."""

    micro_batch_size: int
    oom_retries: int = 0
    elapsed_s: float = 0.0
    history: list[LossPoint] = []
    evals: list[EvalPoint] = []
    best: EvalPoint | None = None  # by `retrain.metric`, ties to the lower eval loss
    evals_without_gain: int = 0  # in a row, for early stopping: no gain over `gain_reference` by min_delta
    gain_reference: float | None = None  # the metric value at the last evaluation that counted as a gain


def trainable_weights(model) -> dict:
    """A CPU copy of the trainable weights (the best evaluation's, kept in memory)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def save_checkpoint(
    root: Path,
    step,
    model,
    optimizer,
    scheduler,
    scaler,
    state: TrainingState,
    rank: Rank,
    best_weights: dict | None = None,
) -> None:
    """Rank 0 writes `step-N` under a temporary name and renames it: a folder with that name is complete.
    The best evaluation's weights go into `best-M` (once per best); only it and the newest `step-N` stay."""
    import torch

    if rank.index == 0:
        keep = set()
        if state.best is not None:
            best = root / BEST.format(step=state.best.step)
            keep.add(best)
            if not best.exists():
                partial = best.with_suffix(".partial")
                partial.mkdir(parents=True, exist_ok=True)
                torch.save(best_weights, partial / "trainable.pt")
                partial.rename(best)
        partial, final = root / f"step-{step:07d}.partial", root / f"step-{step:07d}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save(
            {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}, partial / "trainable.pt"
        )
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            partial / "training.pt",
        )
        (partial / "state.json").write_text(state.model_dump_json())
        partial.rename(final)
        for older in root.iterdir():  # only the newest (and the best it names) are needed to resume
            if older != final and older not in keep:
                shutil.rmtree(older, ignore_errors=True)
    barrier(rank)


def resume(root: Path, model, optimizer, scheduler, scaler, state: TrainingState) -> int:
    """Load the newest complete checkpoint, if any; returns its step (0 when starting fresh)."""
    import torch

    found = sorted((int(m.group(1)), path) for path in root.glob("step-*") if (m := CHECKPOINT.fullmatch(path.name)))
    if not found:
        return 0
    step, path = found[-1]
    load_trainable(model, torch.load(path / "trainable.pt", map_location="cpu"))
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    scaler.load_state_dict(training["scaler"])
    torch.set_rng_state(training["rng"])
    if training["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(training["cuda_rng"])
    saved = TrainingState.model_validate_json((path / "state.json").read_text())
    for field in TrainingState.model_fields:
        setattr(state, field, getattr(saved, field))
    return step


def report_resume(state: TrainingState, resumed_from: int, total_steps: int) -> None:
    """Say where the run resumes, and send the curve so far again, for this flow run's MLflow run."""
    if not resumed_from:
        return
    print(f"train: resuming from the checkpoint at step {resumed_from} of {total_steps}", flush=True)
    for point in state.history:
        emit_event("step", **point.model_dump())
    for point in state.evals:
        emit_event("eval", **point.model_dump())


def load_best(root: Path, state: TrainingState) -> dict | None:
    """The best evaluation's weights that a resumed state names (CPU tensors), or None."""
    import torch

    if state.best is None:
        return None
    return torch.load(root / BEST.format(step=state.best.step) / "trainable.pt", map_location="cpu")


def finish(
    request: TrainRequest,
    env: EnvironmentReport,
    stepper: Stepper,
    tokenizer,
    state: TrainingState,
    choice: Choice,
    runtime_s: float,
    last_step: int,
    total_steps: int,
    per_step: int,
    resumed_from: int,
) -> TrainResult:
    """Rank 0 saves the adapter (or the full model) with its tokenizer and removes the checkpoints, which the output
    supersedes; returns where the output is and how the run went."""
    cfg, model, rank = request.cfg, stepper.model, stepper.rank
    kind = "full" if cfg.mode == "full" else "lora"
    out = request.out_dir / ("model" if kind == "full" else "adapter")
    if rank.index == 0:
        shutil.rmtree(out, ignore_errors=True)
        if kind == "full":
            from transformers import AutoConfig

            # Saved in the base model's own precision: the fp32 master weights were for training only.
            base_dtype = AutoConfig.from_pretrained(request.base.name_or_path, revision=request.base.revision).dtype
            if base_dtype is not None:
                model.to(base_dtype)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        from tunepipe.tasks.model.base import keep_tokenizer_sources

        keep_tokenizer_sources(request.base.name_or_path, out, request.base.revision)
        shutil.rmtree(request.out_dir / "checkpoints", ignore_errors=True)
    barrier(rank)
    return TrainResult(
        adapter_dir=out,
        kind=kind,
        backend=stepper.backend,
        loss_history=state.history,
        runtime_s=round(runtime_s, 3),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        steps=last_step,
        device=env.device,
        precision=env.precision,
        micro_batch_size=state.micro_batch_size,
        gradient_accumulation_steps=math.ceil(per_step / rank.world / state.micro_batch_size),
        oom_retries=state.oom_retries,
        resumed_from_step=resumed_from,
        eval_history=state.evals,
        best_step=state.best.step if state.best else None,
        selected_step=choice.step,
        stopped_early=choice.sft_steps < total_steps,
        selection=choice.reason,
        packed=stepper.packing,
        base_in_4bit=cfg.mode == "qlora" or request.model_cfg.load_in_4bit,
    )
