"""The run's output: the adapter (or the full model) saved with its tokenizer where the stage looks for it, the
checkpoints it supersedes removed, and the `TrainResult` that says how the run went."""

from __future__ import annotations

import math
import shutil

from tunepipe.tasks.train.checkpoints import TrainingState
from tunepipe.tasks.train.environment import EnvironmentReport, barrier
from tunepipe.tasks.train.results import TrainResult
from tunepipe.tasks.train.selection import Choice
from tunepipe.tasks.train.stepper import Stepper
from tunepipe.tasks.train.task import TrainRequest


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
