"""Checkpoints.

Rank 0 writes `step-N` (the trainable weights, optimizer, scheduler, scaler, RNG and `TrainingState`) under a
temporary name and renames it, so a folder of that name is complete; `resume` loads the newest and the run goes
on to the same result as an uninterrupted one. The best evaluation's trainable weights stay beside it in
`best-M`. The stage's output (`tunepipe.tasks.train.output`) supersedes them all.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pydantic import BaseModel

from tunepipe.tasks.runtime.worker import emit_event
from tunepipe.tasks.train.environment import Rank, barrier
from tunepipe.tasks.train.results import EvalPoint, LossPoint

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
