"""The training recipe: LoRA, QLoRA and full fine-tuning, packed and answer-only, then an optional preference phase.

`train_model` is what `tunepipe.tasks.train.task.train` runs in its own process (`tunepipe.tasks.runtime.worker`),
once per device under torchrun; it reads top to bottom as the procedure, and the mechanics live beside it:
- `environment`: the ranks, the backend, the machine checked against the config before any model is loaded;
- `loading`: the model and its adapters, by backend (unsloth on CUDA, transformers + peft elsewhere);
- `batching`: which examples a step trains on (a seeded order, so a resume is exact) and how a micro-batch
  becomes tensors (padded, or packed without leaks across examples);
- `stepper`: a step's forward and backward with the LM head at the loss positions only (`head_loss`), from CUDA
  graphs where a shape repeats (`graphs`), on several ranks through DDP (`data_parallel`);
- `selection`: evaluations on the validation split, the best checkpoint, early stopping, `train.select`;
- `checkpoints`: checkpoints and resume; `output`: the saved result; `progress`: the loss curve; `preference`: KTO
  / DPO steps.
Why a loop of our own and not TRL's SFTTrainer: the LM head applied at the loss positions alone, an exact resume,
packing without leaks, CUDA graphs, and no whole-vocabulary metrics at every step (benchmarks/RESULTS.md,
training speed). The ML stack is imported inside functions; unsloth is imported first, and only when CUDA is there.
"""

from __future__ import annotations

import time

from tunepipe.tasks.train.batching import ExampleOrder, n_loss_tokens, packs, run_layout, step_counts
from tunepipe.tasks.train.checkpoints import TrainingState, load_best, report_resume, resume, save_checkpoint
from tunepipe.tasks.train.environment import TrainingEnvironmentError, choose_backend, set_up
from tunepipe.tasks.train.loading import load_model
from tunepipe.tasks.train.output import finish
from tunepipe.tasks.train.progress import LossLog
from tunepipe.tasks.train.results import TrainResult
from tunepipe.tasks.train.selection import HeldOutEvaluation, Selection
from tunepipe.tasks.train.stepper import Stepper, finish_step, make_optimizer, make_scheduler, summed_over_ranks
from tunepipe.tasks.train.task import TrainRequest


def train_model(request: TrainRequest) -> TrainResult:
    """Train as `request` says; returns where the weights are and how the run went."""
    import torch

    from tunepipe.tasks.train.graphs import graphs_capture  # (these two import torch on import)
    from tunepipe.tasks.train.preference import phase_rows, train_preference

    cfg = request.cfg
    # Set up: the ranks, the backend (unsloth imported first), the machine checked before any model is loaded.
    rank, backend, env = set_up(request)
    device = rank.device()

    # Load: the rows before the model (a wrong set fails fast), the optimizer, and the newest checkpoint if any.
    rows, preference_rows = phase_rows(request.data.rows(), cfg.objective)
    model, tokenizer = load_model(request, backend, env.precision, device, env.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_step, total_steps, preference_steps = step_counts(cfg, len(rows), rank.world)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(cfg, optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")
    state = TrainingState(micro_batch_size=cfg.batch_size)
    checkpoints = request.out_dir / "checkpoints"
    resumed_from = resume(checkpoints, model, optimizer, scheduler, scaler, state)
    report_resume(state, resumed_from, total_steps + preference_steps)

    # Batch: packed where the backend attends within examples; one packed layout where CUDA graphs replay it.
    order = ExampleOrder(len(rows), cfg.seed)
    packing = packs(cfg.packing, backend, device)
    cuda_graphs = cfg.cuda_graphs and device.type == "cuda" and graphs_capture(cfg.mode, request.model_cfg.load_in_4bit)
    layout = (
        run_layout(rows, order, range(resumed_from + 1, total_steps + 1), per_step, state.micro_batch_size)
        if cuda_graphs and rank.world == 1 and packing and backend == "unsloth"
        else None
    )  # graphs: one device
    stepper = Stepper.for_run(request, env, backend, rank, model, tokenizer, scaler, packing, cuda_graphs, layout)
    evaluation = HeldOutEvaluation(request.held_out, cfg.eval_samples, tokenizer, stepper) if cfg.eval_steps else None
    selection = Selection(evaluation, cfg, state, load_best(checkpoints, state))

    # Step, evaluate on the validation split, checkpoint.
    model.train()
    started = time.perf_counter() - state.elapsed_s
    if selection.evaluation and request.init_from and not resumed_from:  # what the attempt continues from: step 0
        selection.evaluate(model, 0)
    log, last_step = LossLog(state, device, started, peaks_from_here=True), resumed_from
    for step in range(resumed_from + 1, total_steps + 1):
        examples = [rows[i] for i in order.step(step, per_step)]
        loss_tokens = sum(n_loss_tokens(row) for row in examples)
        # Loss and gradient norm stay on the device until a logging step reads them: no wait for the GPU between.
        loss_sum = stepper.run(examples[rank.index :: rank.world], loss_tokens, state, step)
        grad_norm = finish_step(
            trainable, optimizer, scheduler, scaler, cfg.max_grad_norm, set_to_none=not stepper.gradients_in_graphs
        )
        log.count(examples)
        if step % cfg.logging_steps == 0 or step == total_steps:
            log.record(step, summed_over_ranks(loss_sum, rank), scheduler.get_last_lr()[0], grad_norm, loss_tokens)
        last_step = step
        if selection.due(step, total_steps):
            selection.evaluate(model, step)
            if selection.stops_early(step, total_steps):
                break
        # Also at SFT's last step when a preference phase follows: its reference is the model at that point. (An
        # early stop saves none: a resume replays the steps to it, which stop there again.)
        if step % cfg.save_steps == 0 and step < total_steps or step == total_steps and preference_steps:
            state.elapsed_s = log.elapsed()
            save_checkpoint(checkpoints, step, model, optimizer, scheduler, scaler, state, rank, selection.best_weights)

    # Select the SFT result, then the preference phase from it.
    choice = selection.choose(model, last_step, resumed_from, total_steps)
    if preference_steps:
        last_step = total_steps + preference_steps
        then = train_preference(request, stepper, preference_rows, state, total_steps, last_step, resumed_from, started)
        choice = choice._replace(reason=f"{choice.reason}; {then}")

    # Finish: the output replaces the checkpoints.
    runtime = log.elapsed()
    return finish(
        request, env, stepper, tokenizer, state, choice, runtime, last_step, total_steps, per_step, resumed_from
    )


def warm_up(settings: str) -> None:
    """What a training worker started early (`tunepipe.tasks.runtime.worker.prestart_worker`) imports before its request
    comes; `settings` is "BACKEND MODE" (train.backend, train.mode). Unsloth only where it will train: it
    patches transformers on import, so it comes first."""
    backend, mode = settings.split()
    try:
        if choose_backend(backend, mode) == "unsloth":
            import unsloth  # noqa: F401
    except TrainingEnvironmentError:  # the request fails with it, as it would in a fresh process
        return
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
