"""The training worker: a lean loop for LoRA, QLoRA and full fine-tuning, packed and answer-only.

`train_model` is what `tasks.train.task.train` runs in its own process (`tasks.runtime.worker`), once per device under
torchrun. Why a loop of our own and not TRL's SFTTrainer (which an earlier version used):
- Answer-only LM head. With a 151,936-token vocabulary the head dominates a small model's cost; the loop
  applies it only at positions that carry loss (a few dozen of ~100 tokens in a RAG example), in chunks
  whose gradients are computed on the way (`tasks/train/head_loss.py`), and never materialises the full logits.
  SFTTrainer also computes entropy and token accuracy over the whole vocabulary at every step
  (measured slower than the raw loop: benchmarks/RESULTS.md, "Figures from code comments (issue 21)").
- Exact resume. A step's examples depend on the step number alone (a seeded permutation per epoch), so a
  checkpoint of the trainable weights, optimizer, scheduler and RNG resumes to the same result as an
  uninterrupted run; out-of-memory retries re-split the same examples into smaller micro-batches.
- Packing without leaks. A micro-batch's examples are concatenated into one row with positions restarting
  at 0; transformers turns that into a block-diagonal mask (`find_packed_sequence_indices`), unsloth into its
  varlen attention (`packed_seq_lengths`); next-token targets never cross an example's end.
- Fewer launches. A small model's step is bound by the host launching kernels; where micro-batches repeat one
  unpadded, unpacked shape, or unsloth's packed rows take the run's one `PackedLayout`, the transformer's
  forward and backward replay from two CUDA graphs (`tasks/train/graphs.py`, `train.cuda_graphs`).
- Several devices: torch's DistributedDataParallel averages the gradients across ranks during the backward
  pass (`tasks/train/data_parallel.py`), skipping the exchange on all but a step's last micro-batch; rank 0 alone
  writes.
- The best checkpoint. Every `train.eval_steps` the held-out loss (and, for an answer metric, greedy answers
  to a few held-out prompts) is measured (`HeldOutEvaluation`); `track_best` keeps the best evaluation's
  trainable weights (in memory, and beside the newest checkpoint on disk) and counts the evaluations without
  improvement for early stopping. With `train.select: best` those weights are what the stage returns.
- Preference tuning (`train.objective` kto, dpo, sft+kto, sft+dpo): the KTO or DPO steps run in this loop's
  worker after the SFT steps (from the SFT result `train.select` chose), numbered on from them, with the same
  checkpoints and resume (`train_preference` below; the rows and TRL's losses in `tasks/train/preference.py`).
The ML stack is imported inside functions; unsloth is imported first, and only when CUDA is there.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tasks.data.format import IGNORE
from tasks.runtime.config import TrainConfig
from tasks.runtime.memory_plan import available_host_memory_gib
from tasks.runtime.worker import emit_event
from tasks.train.results import Backend, EvalPoint, HeldOut, LossPoint, TrainResult
from tasks.train.task import TrainRequest

GIB = 2**30
# `gradient_checkpointing: auto` recomputes only when a step's activations would not fit in this share of the
# free memory: on a GPU with room, a step is faster without (benchmarks/RESULTS.md, issue 7 and issue 21).
AUTO_CHECKPOINTING_SHARE = 0.5
CHECKPOINT = re.compile(r"step-(\d+)")
BEST = "best-{step:07d}"  # the best evaluation's trainable weights, beside the newest checkpoint


class TrainingEnvironmentError(RuntimeError):
    """The config asks for something this machine cannot do; raised before any model is loaded."""


class EnvironmentReport(BaseModel):
    device: str
    precision: str
    free_gib: float | None
    estimate_gib: float
    estimate: dict[str, float]  # GiB per part: weights, gradients, optimizer, activations, logits
    gradient_checkpointing: bool | Literal["offload"]  # `auto` resolved


@dataclass
class Rank:
    index: int = 0
    world: int = 1
    local: int = 0


def train_model(request: TrainRequest) -> TrainResult:
    import torch

    from tasks.runtime.memory_plan import chunk_positions

    cfg = request.cfg
    rank = _init_distributed()
    backend = choose_backend(cfg.backend, cfg.mode, cfg.devices)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (first, before transformers: it patches transformers on import)
    from tasks.runtime.memory_plan import cap_gpu_memory

    cap_gpu_memory(request.model_cfg.gpu_memory_gib, rank.local)
    env = check_environment(request, backend, rank)
    emit_event("started", pid=os.getpid(), backend=backend, **env.model_dump())
    print(f"train: {backend} backend, {cfg.mode} on {env.device}, {env.precision}; memory estimate "
          f"{env.estimate_gib:.2f} GiB {env.estimate} of {env.free_gib} GiB free", flush=True)
    device = torch.device(f"cuda:{rank.local}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    load = _load_unsloth if backend == "unsloth" else _load_hf
    from tasks.train.preference import phase_rows

    rows, preference_rows = phase_rows(request.data.rows(), cfg.objective)  # before loading: a wrong set fails fast
    model, tokenizer = load(request, env.precision, device, env.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, cfg)
    from transformers import get_scheduler

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * rank.world
    # SFT's steps, then the preference phase's (`kto` and `dpo` alone have none of SFT's).
    total_steps = (0 if cfg.objective in ("kto", "dpo")
                   else cfg.max_steps or math.ceil(cfg.epochs * len(rows) / per_step))
    preference_steps = 0 if cfg.objective == "sft" else cfg.preference.max_steps
    scheduler = get_scheduler(schedule_name(cfg), optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")
    state = TrainingState(micro_batch_size=cfg.batch_size)
    checkpoints = request.out_dir / "checkpoints"
    resumed_from = _resume(checkpoints, model, optimizer, scheduler, scaler, state)
    best_weights = _load_best(checkpoints, state)
    if resumed_from:
        print(f"train: resuming from the checkpoint at step {resumed_from} of {total_steps + preference_steps}",
              flush=True)
        for point in state.history:  # the curve so far, for this flow run's MLflow run
            emit_event("step", **point.model_dump())
        for point in state.evals:
            emit_event("eval", **point.model_dump())

    order = ExampleOrder(len(rows), cfg.seed)
    packing = cfg.packing and (backend == "hf" or unsloth_packs(device))
    if cfg.packing and not packing:
        print("train: unsloth backend without torch's varlen attention on this GPU: micro-batches are padded "
              "(sorted by length), not packed", flush=True)
    # hf masks packed rows with a dense block-diagonal mask, so its rows stay short; unsloth masks packed
    # examples only in a one-row batch, through a varlen kernel that costs nothing per masked pair.
    row_tokens = request.model_cfg.max_seq_length if backend == "hf" else None
    cuda_graphs = cfg.cuda_graphs and device.type == "cuda" and graphs_capture(cfg.mode, request.model_cfg.load_in_4bit)
    layout = None
    if cuda_graphs and rank.world == 1 and packing and backend == "unsloth":  # (graphs run on one device only)
        layout = packed_layout(micro_batch_lengths(rows, order, range(resumed_from + 1, total_steps + 1), per_step,
                                                   state.micro_batch_size))
        if layout:
            print(f"train: packed micro-batches laid out as one row of {layout.width} tokens in {layout.segments} "
                  f"blocks (padding included), so that CUDA graphs replay them", flush=True)
    stepper = Stepper(model=model, scaler=scaler, device=device, precision=env.precision, backend=backend,
                      packing=packing, row_tokens=row_tokens, pad_id=tokenizer.pad_token_id,
                      head_chunk=chunk_positions(model.config.vocab_size, bool(env.gradient_checkpointing)),
                      max_oom_retries=cfg.max_oom_retries, rank=rank, cuda_graphs=cuda_graphs,
                      packed_layout=layout)
    evaluation = (HeldOutEvaluation(request.held_out, cfg.eval_samples, tokenizer, stepper)
                  if cfg.eval_steps else None)
    model.train()
    started = time.perf_counter() - state.elapsed_s
    if evaluation and request.init_from and not resumed_from:  # what the attempt continues from: step 0
        best_weights = _evaluated(evaluation, model, 0, state, cfg, best_weights)
    tokens_since_log, last_log = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last_step, stop = resumed_from, False
    for step in range(resumed_from + 1, total_steps + 1):
        examples = [rows[i] for i in order.step(step, per_step)]
        local = examples[rank.index :: rank.world]
        loss_tokens = sum(_n_loss_tokens(row) for row in examples)
        # Loss and gradient norm stay on the device until a logging step reads them: no wait for the GPU between.
        loss_sum = stepper.run(local, loss_tokens, state, step)
        grad_norm = _finish_step(trainable, optimizer, scheduler, scaler, cfg.max_grad_norm,
                                 set_to_none=not stepper.gradients_in_graphs)
        tokens_since_log += sum(len(row["input_ids"]) for row in examples)
        if step % cfg.logging_steps == 0 or step == total_steps:
            if rank.world > 1:
                torch.distributed.all_reduce(loss_sum)
            now = time.perf_counter()
            point = LossPoint(
                step=step, loss=float(loss_sum) / max(loss_tokens, 1), learning_rate=scheduler.get_last_lr()[0],
                grad_norm=round(float(grad_norm), 6), tokens_per_s=round(tokens_since_log / (now - last_log), 1),
                peak_gpu_memory_gib=(round(torch.cuda.max_memory_allocated(device) / GIB, 3)
                                     if device.type == "cuda" else None),
                peak_gpu_reserved_gib=(round(torch.cuda.max_memory_reserved(device) / GIB, 3)
                                       if device.type == "cuda" else None),
                elapsed_s=round(now - started, 3),
            )
            state.history.append(point)
            emit_event("step", **point.model_dump())
            tokens_since_log, last_log = 0, now
        last_step = step
        if evaluation and (step % cfg.eval_steps == 0 or step == total_steps):
            best_weights = _evaluated(evaluation, model, step, state, cfg, best_weights)
            stop = (cfg.early_stopping is not None and state.evals_without_gain >= cfg.early_stopping.patience
                    and step < total_steps)
        if stop:
            print(f"train: early stopping at step {step}: {request.held_out.metric} did not improve for "
                  f"{state.evals_without_gain} evaluations", flush=True)
            break
        # Also at SFT's last step when a preference phase follows: its reference is the model at that point. (An
        # early stop saves none: a resume replays the steps to it, which stop there again.)
        if step % cfg.save_steps == 0 and step < total_steps or step == total_steps and preference_steps:
            state.elapsed_s = time.perf_counter() - started
            _save_checkpoint(checkpoints, step, model, optimizer, scheduler, scaler, state, rank, best_weights)
    in_preference = resumed_from > total_steps  # resumed inside the preference phase: SFT's result is chosen
    sft_steps = (state.evals[-1].step if state.evals else total_steps) if in_preference else last_step
    evaluated = evaluation is not None and state.best is not None  # (`kto` / `dpo` alone have no SFT steps)
    selected = state.best.step if evaluated and cfg.selection == "best" else sft_steps
    if selected != sft_steps and not in_preference:  # the SFT result; a preference phase starts from it
        _load_trainable(model, best_weights)
    selection = selection_reason(state, cfg.selection, selected, sft_steps, total_steps,
                                 request.held_out.metric if evaluated else None)
    if preference_steps:
        train_preference(PreferenceRun(
            cfg=cfg, stepper=stepper, rows=preference_rows, out_dir=request.out_dir, state=state,
            first_step=total_steps, last_step=total_steps + preference_steps, resumed_from=resumed_from,
            started=started, from_base=total_steps == 0 and request.init_from is None,
        ))
        last_step = total_steps + preference_steps
        selection += f"; then {cfg.objective.removeprefix('sft+')} steps {total_steps + 1}-{last_step} from it"
    runtime = time.perf_counter() - started

    kind = "full" if cfg.mode == "full" else "lora"
    out = request.out_dir / ("model" if kind == "full" else "adapter")
    if rank.index == 0:
        _save_output(model, tokenizer, out, kind, request)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the output supersedes them
    _barrier(rank)
    return TrainResult(
        adapter_dir=out, kind=kind, backend=backend, loss_history=state.history, runtime_s=round(runtime, 3),
        trainable_params=sum(p.numel() for p in trainable), total_params=sum(p.numel() for p in model.parameters()),
        steps=last_step, device=env.device, precision=env.precision, micro_batch_size=state.micro_batch_size,
        gradient_accumulation_steps=math.ceil(per_step / rank.world / state.micro_batch_size),
        oom_retries=state.oom_retries, resumed_from_step=resumed_from, eval_history=state.evals,
        best_step=state.best.step if state.best else None,
        selected_step=selected if evaluated else None, stopped_early=sft_steps < total_steps, selection=selection,
        packed=packing, base_in_4bit=cfg.mode == "qlora" or request.model_cfg.load_in_4bit,
    )


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


class ExampleOrder:
    """Which examples step N trains on: a seeded shuffle per epoch, so it depends on N alone (exact resume)."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed, self.epochs = n_rows, seed, {}

    def step(self, step: int, per_step: int) -> list[int]:
        start = (step - 1) * per_step
        return [self._at(i) for i in range(start, start + per_step)]

    def _at(self, position: int) -> int:
        import torch

        epoch, index = divmod(position, self.n_rows)
        if epoch not in self.epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.epochs = {epoch: torch.randperm(self.n_rows, generator=generator).tolist()}
        return self.epochs[epoch][index]


def micro_batch_lengths(rows: list[dict], order: ExampleOrder, steps: range, per_step: int,
                       micro_batch_size: int) -> list[list[int]]:
    """The example lengths of every micro-batch these steps will run (one device; packed micro-batches keep the
    step's order), for the packed layout."""
    lengths = []
    for step in steps:
        examples = [len(rows[i]["input_ids"]) for i in order.step(step, per_step)]
        lengths += [examples[start : start + micro_batch_size] for start in range(0, per_step, micro_batch_size)]
    return lengths


# ---------------------------------------------------------------------------------------------------- setup


def schedule_name(cfg) -> str:
    # transformers' "constant" would skip the warm-up; ours warms up like the others.
    return "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler


def warm_up(settings: str) -> None:
    """What a training worker started early (`tasks.runtime.worker.prestart_worker`) imports before its request
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


def choose_backend(requested: str, mode: str = "lora", devices: int = 1) -> Backend:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "unsloth":
        if not has_cuda:
            raise TrainingEnvironmentError(
                "train.backend=unsloth needs a CUDA GPU; use backend: hf (or auto) on this machine")
        if mode == "full" or devices > 1:
            raise TrainingEnvironmentError(
                "train.backend=unsloth trains adapters on one GPU here; use backend: hf (or auto) for "
                "train.mode=full or train.devices > 1")
        return "unsloth"
    if requested == "auto":
        usable = has_cuda and mode != "full" and devices == 1 and importlib.util.find_spec("unsloth")
        return "unsloth" if usable else "hf"
    return "hf"


def check_environment(request: TrainRequest, backend: Backend, rank: Rank) -> EnvironmentReport:
    """Device, precision and free memory against an estimate of what the config needs; fail before loading."""
    import torch
    from transformers import AutoConfig

    cfg, model_cfg = request.cfg, request.model_cfg
    cuda = torch.cuda.is_available()
    four_bit = cfg.mode == "qlora" or model_cfg.load_in_4bit
    if four_bit and not cuda:
        raise TrainingEnvironmentError(
            "train.mode=qlora (a 4-bit base, bitsandbytes) needs a CUDA GPU and this machine has none; "
            "use train.mode: lora")
    if cfg.optimizer == "adamw_8bit" and not cuda:
        raise TrainingEnvironmentError("train.optimizer=adamw_8bit (bitsandbytes) needs a CUDA GPU; use adamw")
    if cfg.objective != "sft" and cfg.devices > 1:
        raise TrainingEnvironmentError(f"train.objective={cfg.objective} trains on one device here; set "
                                       "train.devices: 1")
    if cuda and cfg.devices > torch.cuda.device_count():
        raise TrainingEnvironmentError(
            f"train.devices={cfg.devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise TrainingEnvironmentError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")

    config = AutoConfig.from_pretrained(request.base.name_or_path, revision=request.base.revision)
    if cuda:
        from tasks.runtime.memory_plan import free_gpu_bytes

        free = free_gpu_bytes(rank.local, model_cfg.gpu_memory_gib) / GIB
        device = f"cuda ({torch.cuda.get_device_name(rank.local)}) x{rank.world}"
    else:
        free = available_host_memory_gib()
        device = f"cpu x{rank.world}"
    checkpointing = cfg.gradient_checkpointing
    auto = checkpointing == "auto"
    estimate = estimate_memory(config, request, precision, four_bit, False if auto else checkpointing)
    if auto:
        checkpointing = free is None or sum(estimate.values()) > AUTO_CHECKPOINTING_SHARE * free
        if checkpointing:  # it would not fit without recomputation: estimate with it
            estimate = estimate_memory(config, request, precision, four_bit, True)
    need = sum(estimate.values())
    if free is not None and need > free:
        parts = ", ".join(f"{name} {gib:.2f}" for name, gib in estimate.items())
        raise TrainingEnvironmentError(
            f"this training needs about {need:.1f} GiB ({parts}) and {device} has {free:.1f} GiB free; "
            "try train.mode: qlora or lora, a smaller train.batch_size with more gradient_accumulation_steps, "
            "train.gradient_checkpointing: true, or a shorter model.max_seq_length")
    return EnvironmentReport(device=device, precision=precision, free_gib=None if free is None else round(free, 2),
                             estimate_gib=round(need, 2), estimate={k: round(v, 3) for k, v in estimate.items()},
                             gradient_checkpointing=checkpointing)


def estimate_memory(config, request: TrainRequest, precision: str, four_bit: bool,
                    checkpointing: bool | Literal["offload"]) -> dict[str, float]:
    """GiB by part, from the model's config alone (a meta-device model: no weights are read)."""
    from tasks.runtime.memory_plan import model_shape, training_memory

    data = request.data
    return training_memory(model_shape(config), request.cfg, request.lora, request.cfg.batch_size * data.max_tokens,
                           data.n_trained_tokens / max(data.n_tokens, 1), precision, four_bit, checkpointing)


def _init_distributed() -> Rank:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Rank()
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Rank(index=torch.distributed.get_rank(), world=world, local=local)


def _barrier(rank: Rank) -> None:
    if rank.world > 1:
        import torch

        torch.distributed.barrier()


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _load_hf(request: TrainRequest, precision: str, device, checkpointing: bool | Literal["offload"]):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.runtime.base_model import load_tokenizer

    cfg, lora = request.cfg, request.lora
    four_bit = cfg.mode == "qlora" or request.model_cfg.load_in_4bit
    full = cfg.mode == "full"
    source = str(request.init_from) if full and request.init_from else request.base.name_or_path
    quantization = None
    if four_bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=_dtype(precision))
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=None if source != request.base.name_or_path else request.base.revision,
        quantization_config=quantization, attn_implementation="sdpa",
        # Full fine-tuning keeps fp32 master weights (autocast computes in 16 bits); a frozen base needs no more.
        dtype=torch.float32 if full else _dtype(precision),
        device_map={"": device} if four_bit else None,
    )
    if not four_bit:
        model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from tasks.train.recompute import checkpoint_layers

        checkpoint_layers(model, checkpointing)
    if not full:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            bias=lora.bias, use_rslora=lora.use_rslora, task_type="CAUSAL_LM",
        ))
        _load_adapter_weights(model, request.init_from)
    return model, load_tokenizer(request.base, request.model_cfg.chat_template)


def _load_unsloth(request: TrainRequest, precision: str, device, checkpointing: bool | Literal["offload"]):
    from unsloth import FastLanguageModel  # CUDA only: never imported on the CPU path

    cfg, lora = request.cfg, request.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=request.base.name_or_path, revision=request.base.revision,
        max_seq_length=request.model_cfg.max_seq_length, dtype=_dtype(precision),
        load_in_4bit=cfg.mode == "qlora" or request.model_cfg.load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias=lora.bias, use_rslora=lora.use_rslora, random_state=cfg.seed,
        use_gradient_checkpointing=bool(checkpointing),
    )
    if checkpointing:  # unsloth turned it on; the layers' recomputation is ours (tasks/train/recompute.py)
        from tasks.train.recompute import checkpoint_layers

        checkpoint_layers(model, checkpointing)
    _load_adapter_weights(model, request.init_from)
    if request.model_cfg.chat_template:
        tokenizer.chat_template = request.model_cfg.chat_template
    return model, tokenizer


def graphs_capture(mode: str = "lora", load_in_4bit: bool = False) -> bool:
    """Whether `tasks/train/graphs.py` captures the transformer's step: LoRA on a 16-bit base, with or without
    recomputation (what the GPU tests prove; QLoRA's 4-bit kernels and full fine-tuning are not proven yet)."""
    return mode == "lora" and not load_in_4bit


def unsloth_packs(device) -> bool:
    """Whether unsloth attends within packed examples in one kernel call: torch's `varlen_attn` (flash) on an
    Ampere or newer GPU. Otherwise unsloth 2026.10 would attend one run of equal example lengths at a time,
    slower than padding (benchmarks/RESULTS.md, issue 20 item 3), and the loop pads instead.

    unsloth takes `varlen_attn` from torch >= 2.12, whose signature has `enable_gqa`; on torch 2.11, which has
    the kernel without that argument, it is handed `_varlen_attn_with_gqa(device)`."""
    import torch
    from unsloth.utils import attention_dispatch

    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    if attention_dispatch._TORCH_VARLEN_ATTN is None:
        attention_dispatch._TORCH_VARLEN_ATTN = _varlen_attn_with_gqa(device)
    return attention_dispatch._TORCH_VARLEN_ATTN is not None


def _varlen_attn_with_gqa(device):
    """torch 2.11's `varlen_attn` behind torch 2.12's signature. Flash attention groups K / V heads itself (query
    head h reads K / V head h // group, forward and backward), so grouped K / V go to the kernel as they are
    where this torch's wrapper lets them through and the kernel gives what repeated heads give; elsewhere each
    K / V head is repeated for its group, as SDPA does without `enable_gqa` (a copy of K and V a layer, kept for
    the backward pass)."""
    import inspect

    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None
    if not torch.backends.cuda.is_flash_attention_available():
        return None
    groups_kv_heads = _kernel_groups_kv_heads(varlen_attn, device)

    def attend(query, key, value, *args, enable_gqa: bool = False, **kwargs):  # (tokens, heads, head_dim)
        if enable_gqa and not groups_kv_heads:
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        return varlen_attn(query, key, value, *args, **kwargs)

    return attend


def _kernel_groups_kv_heads(varlen_attn, device) -> bool:
    """Whether `varlen_attn` takes half as many K / V heads as query heads and attends as with each repeated:
    one call on two short causal sequences."""
    import torch

    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (torch.randn(8, heads, 64, generator=generator, device=device, dtype=torch.bfloat16)
                         for heads in (4, 2, 2))
    bounds = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    try:
        grouped = varlen_attn(query, key, value, bounds, bounds, 5, 5, window_size=(-1, 0))
    except (RuntimeError, ValueError):  # a wrapper that checks the head counts
        return False
    repeated = varlen_attn(query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), bounds, bounds,
                           5, 5, window_size=(-1, 0))
    return torch.allclose(grouped, repeated, rtol=0, atol=1e-2)


def _load_adapter_weights(model, init_from: Path | None) -> None:
    if init_from is None:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(init_from / "adapter_model.safetensors"))


def _optimizer(model, cfg):
    import torch

    # As transformers' Trainer does: no weight decay on biases and norm weights (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------- the step


def _n_loss_tokens(row: dict) -> int:
    return sum(label != IGNORE for label in row["labels"][1:])


@dataclass(frozen=True)
class PackedLayout:
    """One shape for every packed micro-batch of a run, so that CUDA graphs can replay them
    (`tasks/train/graphs.py`): one row of `width` tokens in `segments` blocks, none longer than `longest`. A
    micro-batch's examples come first, then its padding in blocks of at most `longest` tokens (the attention
    kernel is told no block is longer), then empty blocks up to `segments`."""

    width: int
    segments: int
    longest: int

    def blocks(self, lengths: list[int]) -> list[int] | None:
        """The row's block lengths for these examples, or None when they do not fit."""
        pad = self.width - sum(lengths)
        if pad < 0 or max(lengths) > self.longest:
            return None
        blocks = lengths + [self.longest] * (pad // self.longest) + ([pad % self.longest] if pad % self.longest else [])
        return blocks + [0] * (self.segments - len(blocks)) if len(blocks) <= self.segments else None


def packed_layout(micro_batches: list[list[int]], max_padding: float = 0.25) -> PackedLayout | None:
    """The layout that holds every one of a run's packed micro-batches (their example lengths), or None when
    padding them all to the widest would cost more than `max_padding` of the tokens the transformer runs
    (replaying a graph saves less than that on launches), or when fewer than two micro-batches are packed."""
    packed = [lengths for lengths in micro_batches if len(set(lengths)) > 1]  # make_batch packs these alone
    if len(packed) < 2:
        return None
    width = max(sum(lengths) for lengths in packed)
    if 1 - sum(sum(lengths) for lengths in packed) / (width * len(packed)) > max_padding:
        return None
    longest = max(max(lengths) for lengths in packed)
    segments = max(len(lengths) + math.ceil((width - sum(lengths)) / longest) for lengths in packed)
    return PackedLayout(width=width, segments=segments, longest=longest)


def make_batch(rows: list[dict], packing: bool, pad_id: int, device, row_tokens: int | None = None,
               layout: PackedLayout | None = None) -> dict:
    """Model inputs and next-token targets; targets never cross an example's end (IGNORE there).

    Packed: examples are placed first-fit (longest first) into rows of at most `row_tokens` tokens (one row
    when None), positions restart at 0 for every example, and a row's padding is a block of its own, so
    attention stays block-diagonal (transformers reads the blocks from the positions). Bounded rows keep the
    dense attention mask small: one row of 64 short examples wastes most of its attention on masked pairs.
    With a `layout` the examples that fit it make one row of its shape instead, whatever their lengths.
    Unpacked: one example a row, right-padded, with an attention mask only where a row is padded: rows of
    equal length need none, and without one attention stays on the causal kernels (flash / varlen). So
    examples of one length are never packed: packing would remove no padding and cost a block mask or, on
    unsloth, a copy of every layer's attention output.
    """
    import torch

    targets = [row["labels"][1:] + [IGNORE] for row in rows]
    lengths = [len(row["input_ids"]) for row in rows]
    if packing and len(set(lengths)) > 1:
        layout_row = layout.blocks(lengths) if layout else None
        if layout_row is not None:  # one row of the layout's shape: the examples in order, then its padding blocks
            bins, width, paddings = [list(range(len(rows)))], layout.width, [layout_row[len(rows):]]
        else:
            bins: list[list[int]] = []
            for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
                fits = next((b for b in bins if row_tokens is None or sum(lengths[j] for j in b) + lengths[i]
                             <= row_tokens), None)
                if fits is None:
                    bins.append([i])
                else:
                    fits.append(i)
            width = max(sum(lengths[j] for j in b) for b in bins)
            paddings = [[pad] if (pad := width - sum(lengths[j] for j in b)) else [] for b in bins]
        batch = {key: [] for key in ("input_ids", "position_ids", "targets", "example")}
        blocks = []
        for b, padding in zip(bins, paddings):
            pad = sum(padding)
            batch["input_ids"].append(_joined(rows[j]["input_ids"] for j in b) + [pad_id] * pad)
            batch["position_ids"].append(_joined(range(n) for n in [lengths[j] for j in b] + padding))
            batch["targets"].append(_joined(targets[j] for j in b) + [IGNORE] * pad)
            batch["example"].append(_joined([j] * lengths[j] for j in b) + [-1] * pad)
            blocks += [lengths[j] for j in b] + padding
        tensors = _to_device(batch, device)
        lengths_tensor = torch.tensor(blocks, dtype=torch.int32)  # pinned: copied to the GPU without a wait
        tensors["packed_seq_lengths"] = lengths_tensor.pin_memory() if device.type == "cuda" else lengths_tensor
        return tensors
    width = max(lengths)
    pad = [width - n for n in lengths]
    batch = {
        "input_ids": [row["input_ids"] + [pad_id] * n for row, n in zip(rows, pad)],
        "targets": [t + [IGNORE] * n for t, n in zip(targets, pad)],
        "example": [[i] * (width - n) + [-1] * n for i, n in enumerate(pad)],
    }
    if any(pad):
        batch["attention_mask"] = [[1] * len(row["input_ids"]) + [0] * n for row, n in zip(rows, pad)]
    return _to_device(batch, device)


def _joined(parts) -> list[int]:
    """One list of the parts' items, in linear time (`sum(parts, [])` copies the list so far at every part)."""
    return list(itertools.chain.from_iterable(parts))


def _to_device(batch: dict[str, list[list[int]]], device) -> dict:
    """The model inputs as tensors, and where the loss is, in place of the per-token `targets` and `example`
    lists: the flat positions that carry a target, their targets and their examples (`loss_at`, `loss_targets`,
    `loss_example`). Found here on the host, so selecting them on the GPU needs no synchronisation (a boolean
    mask would wait for the forward pass to finish)."""
    import torch

    targets, examples = _joined(batch.pop("targets")), _joined(batch.pop("example"))
    loss_at = [i for i, target in enumerate(targets) if target != IGNORE]
    batch |= {"loss_at": loss_at, "loss_targets": [targets[i] for i in loss_at],
              "loss_example": [examples[i] for i in loss_at]}
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if device.type != "cuda":
        return tensors
    return {key: tensor.pin_memory().to(device, non_blocking=True) for key, tensor in tensors.items()}


def token_losses(model, batch: dict, backend: Backend, head_chunk: int, transformer=None):
    """Cross-entropy of every loss-carrying token, with the LM head applied at those positions only, in chunks
    that never keep more than one chunk's logits (`tasks/train/head_loss.py`).

    Returns (sum of the losses, differentiable; each token's loss, detached; example index of each loss);
    the base transformer runs once over the whole batch (through `transformer` when given: CUDA graphs).
    """
    from tasks.train.head_loss import head_cross_entropy

    hidden, head = loss_hidden(model, batch, backend, transformer)
    total, losses = head_cross_entropy(hidden, head, batch["loss_targets"], head_chunk)
    return total, losses, batch["loss_example"]


def causal_lm_of(model):
    """The causal LM inside a peft model (its LoRA layers in place), or the model itself (full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_hidden(model, batch: dict, backend: Backend, transformer=None):
    """(hidden states at the loss-carrying positions, the LM head): the base transformer run once over the batch,
    by `transformer(inputs)` when given (`tasks/train/graphs.py`)."""
    causal_lm = causal_lm_of(model)
    # No KV cache: transformers detects packed rows (and masks across examples) only without one.
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:  # packed: positions restart at every example
        inputs["position_ids"] = batch["position_ids"]
        if backend == "unsloth":
            inputs["packed_seq_lengths"] = batch["packed_seq_lengths"]
    hidden = transformer(inputs) if transformer else causal_lm.base_model(**inputs).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch["loss_at"]), causal_lm.get_output_embeddings()


@dataclass
class Stepper:
    """Forward and backward of a step's examples, in micro-batches, with the out-of-memory fallback; on several
    ranks through DistributedDataParallel."""

    model: object
    scaler: object
    device: object
    precision: str
    backend: Backend
    packing: bool
    row_tokens: int | None  # longest packed row (None: a micro-batch is one row)
    head_chunk: int  # positions per LM-head chunk (tasks/train/head_loss.py)
    pad_id: int
    max_oom_retries: int
    rank: Rank
    cuda_graphs: bool = False  # replay the transformer from CUDA graphs where a shape repeats (one device)
    packed_layout: PackedLayout | None = None  # unsloth's packed micro-batches in one shape, for the graphs

    def __post_init__(self):
        from functools import partial

        self.graphs = None
        if self.cuda_graphs and self.rank.world == 1:
            from tasks.train.graphs import TransformerGraphs

            self.graphs = TransformerGraphs(causal_lm_of(self.model).base_model, self.packed_layout)
        self.losses = partial(token_losses, backend=self.backend, head_chunk=self.head_chunk,
                              transformer=self.graphs)
        self.parallel = None
        if self.rank.world > 1:
            from tasks.train.data_parallel import data_parallel

            self.parallel = data_parallel(self.model, self.losses, self.device)

    @property
    def gradients_in_graphs(self) -> bool:
        """Whether a captured graph writes the gradients: then they stay allocated between steps (zeroed, not
        set to None; tasks/train/graphs.py)."""
        return self.graphs is not None and self.graphs.graphed is not None

    def run(self, rows: list[dict], loss_tokens: int, state: TrainingState, step: int):
        """Accumulate the gradients of `rows`; returns their summed token loss (a detached tensor). On CUDA
        out-of-memory, halve the micro-batch (the same examples, so the same effective batch) and redo the step."""
        import torch

        if not self.packing:  # similar lengths share a micro-batch: less padding, the same step
            rows = sorted(rows, key=lambda row: len(row["input_ids"]))
        while True:
            try:
                starts = range(0, len(rows), state.micro_batch_size)
                return sum(self._micro(rows[start : start + state.micro_batch_size], loss_tokens,
                                       last=start == starts[-1]) for start in starts)
            except torch.cuda.OutOfMemoryError:
                self.model.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                # Ranks cannot agree on a retry without more communication: several devices fail instead.
                if self.rank.world > 1 or state.micro_batch_size == 1 or state.oom_retries >= self.max_oom_retries:
                    raise
                before = state.micro_batch_size
                state.micro_batch_size = before // 2
                state.oom_retries += 1
                self.packed_layout = None  # its rows are as wide as the larger micro-batches': no memory saved
                message = (f"CUDA out of memory at step {step} with micro-batch {before}: retrying with "
                           f"micro-batch {state.micro_batch_size} and twice the accumulation (same effective "
                           f"batch; retry {state.oom_retries} of at most {self.max_oom_retries})")
                print(f"train: {message}", flush=True)
                emit_event("oom_retry", step=step, retries=state.oom_retries,
                           micro_batch_size=state.micro_batch_size, message=message)

    def _micro(self, rows: list[dict], loss_tokens: int, last: bool = True):
        import contextlib

        import torch

        # The layout's padding buys nothing once the graphs are off.
        layout = self.packed_layout if self.graphs is not None and not self.graphs.failed else None
        batch = make_batch(rows, self.packing, self.pad_id, self.device, self.row_tokens, layout)
        # Gradients are exchanged once a step: with the last micro-batch's backward pass.
        sync = contextlib.nullcontext() if self.parallel is None or last else self.parallel.no_sync()
        with sync:
            # No autocast cache: CUDA graphs cannot capture it, and bf16 / fp16 weights are not cast anyway.
            with torch.autocast(self.device.type, dtype=_dtype(self.precision), enabled=self.precision != "fp32",
                                cache_enabled=False):
                loss_sum, _, _ = self.parallel(batch) if self.parallel else self.losses(self.model, batch)
            # Scaled to the whole step's mean token loss over all micro-batches and ranks; DDP averages the
            # ranks' gradients, so each rank's share is scaled up by their number to make that a sum.
            self.scaler.scale(loss_sum * self.rank.world / loss_tokens).backward()
        return loss_sum.detach()


def _finish_step(trainable, optimizer, scheduler, scaler, max_grad_norm, set_to_none: bool = True):
    """Clip, step the optimizer and the schedule (the gradients are already the same on every rank); returns
    the gradient norm (a tensor)."""
    import torch

    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return norm


# ------------------------------------------------------------------------- held-out evaluation, selection


class HeldOutEvaluation:
    """The held-out checks during training (train.eval_steps), on the model as it trains.

    The loss runs over the whole eval split in batches of `eval.batch_size` rows, with the training step's own
    forward pass and LM head (`token_losses`) and no gradients: the same token-weighted mean the evaluate
    stage reports. An answer metric (`retrain.metric` other than eval_loss) is scored by `tasks.chat.metrics` on
    greedy answers (`tasks.chat.generation`, as the evaluate stage decodes) to the first `train.eval_samples`
    held-out prompts, which are also the first the evaluate stage answers. Every rank measures the same, so
    all of them take the same early-stopping decision without exchanging it.
    """

    def __init__(self, held_out: HeldOut, samples: int, tokenizer, stepper: Stepper):
        from tasks.chat.examples import read_examples
        from tasks.chat.metrics import required_keys

        self.held_out, self.tokenizer, self.stepper = held_out, tokenizer, stepper
        self.batch_size = held_out.batch_size  # halved on out-of-memory
        # Sorted by length, as the evaluate stage does: similar lengths share a batch.
        self.rows = sorted(held_out.loss_rows.rows(), key=lambda row: len(row["input_ids"]))
        examples = list(read_examples(held_out.examples))[:samples] if held_out.metric != "eval_loss" else []
        self.conversations = [[message.model_dump() for message in example.prompt] for example in examples]
        self.references = [example.answer for example in examples]
        self.required = (required_keys(example.answer for example in read_examples(held_out.train_examples))
                         if examples and held_out.output_format == "json" else [])

    def __call__(self, model, step: int) -> EvalPoint:
        import torch

        started = time.perf_counter()
        model.eval()  # no dropout
        with torch.no_grad():
            loss, metrics = self._measured(model)
        model.train()
        peak = (round(torch.cuda.max_memory_allocated(self.stepper.device) / GIB, 3)
                if self.stepper.device.type == "cuda" else None)
        point = EvalPoint(step=step, eval_loss=loss, metrics=metrics, elapsed_s=round(time.perf_counter() - started, 3),
                          peak_gpu_memory_gib=peak)
        if selection_value(point, self.held_out.metric) is None:
            raise ValueError(f"retrain.metric {self.held_out.metric!r} was not measured on the {len(self.references)} "
                             f"held-out prompts of train.eval_samples (measured: {', '.join(sorted(metrics))})")
        return point

    def _measured(self, model) -> tuple[float, dict[str, float]]:
        """The loss and the answer metrics; on CUDA out-of-memory (the optimizer state is still on the device),
        again at half the batch, kept for the later evaluations."""
        import torch

        while True:
            try:
                return self._loss(model), self._metrics(model) if self.conversations else {}
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
            torch.cuda.empty_cache()  # after the except block: the failed batch's tensors are released by then
            self.batch_size //= 2
            print(f"train: CUDA out of memory in the held-out evaluation: batches of {self.batch_size} from now on",
                  flush=True)

    def _loss(self, model) -> float:
        import torch

        stepper, batch_size = self.stepper, self.batch_size
        total, count = 0.0, 0
        for start in range(0, len(self.rows), batch_size):
            batch = make_batch(self.rows[start : start + batch_size], stepper.packing, stepper.pad_id,
                               stepper.device, stepper.row_tokens)
            with torch.autocast(stepper.device.type, dtype=_dtype(stepper.precision),
                                enabled=stepper.precision != "fp32"):
                loss_sum, _, _ = stepper.losses(model, batch)
            total += loss_sum.float()
            count += len(batch["loss_targets"])
        return float(total) / max(count, 1)

    def _metrics(self, model) -> dict[str, float]:
        from tasks.chat.generation import greedy_answers, switches_undone
        from tasks.chat.metrics import score_answers

        if self.stepper.backend == "unsloth":
            answers = _unsloth_answers(model, self.tokenizer, self.conversations, self.held_out.max_new_tokens,
                                       self.batch_size)
        else:
            with switches_undone(model):  # the decoder's attention and norms must not stay on a model that trains
                answers = greedy_answers(model, self.tokenizer, self.conversations, self.held_out.max_new_tokens,
                                         self.batch_size)
        means, _ = score_answers([a.text for a in answers], self.references, [a.stopped for a in answers],
                                 self.held_out.output_format, self.required)
        return means


def _unsloth_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int):
    """Greedy answers from unsloth's model the way unsloth generates in the middle of training: its inference
    mode around `generate` (its attention is its own, so the evaluate stage's decoder does not apply).
    Not tested here: there is no CUDA GPU in CI."""
    import torch
    from unsloth import FastLanguageModel

    from tasks.chat.generation import render_prompt, stop_token_ids, to_answer

    stops = stop_token_ids(model, tokenizer)
    prompts = [render_prompt(tokenizer, conversation) for conversation in conversations]
    answers = []
    FastLanguageModel.for_inference(model)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            answers += [to_answer(tokenizer, tokens, stops) for tokens in out[:, width:].tolist()]
    finally:
        FastLanguageModel.for_training(model)
    return answers


def selection_value(point: EvalPoint, metric: str) -> float | None:
    return point.eval_loss if metric == "eval_loss" else point.metrics.get(metric)


def beats(point: EvalPoint, other: EvalPoint | None, metric: str) -> bool:
    """Whether `point` is a better checkpoint than `other` by `metric`; equal values go to the lower eval loss."""
    from tasks.chat.metrics import improvement

    if other is None:
        return True
    gain = improvement(metric, selection_value(point, metric), selection_value(other, metric))
    return gain > 0 or (gain == 0 and point.eval_loss < other.eval_loss)


def track_best(state: TrainingState, point: EvalPoint, metric: str, min_delta: float) -> bool:
    """Record an evaluation: the best so far and the count of evaluations without a gain of more than
    `min_delta` (early stopping's patience). Returns whether `point` is the new best."""
    from tasks.chat.metrics import improvement

    state.evals.append(point)
    value = selection_value(point, metric)
    if state.gain_reference is None or improvement(metric, value, state.gain_reference) > min_delta:
        state.gain_reference, state.evals_without_gain = value, 0
    else:
        state.evals_without_gain += 1
    if beats(point, state.best, metric):
        state.best = point
        return True
    return False


def _evaluated(evaluation: HeldOutEvaluation, model, step: int, state: TrainingState, cfg,
               best_weights: dict | None) -> dict | None:
    """Evaluate at `step`, report it, and return the best weights so far (a CPU copy when this step is it)."""
    point = evaluation(model, step)
    min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
    if track_best(state, point, evaluation.held_out.metric, min_delta):
        best_weights = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()
                        if p.requires_grad}
    shown = ", ".join(f"{name} {value:.4g}" for name, value in point.metrics.items() if "." not in name)
    print(f"train: step {step}: held-out loss {point.eval_loss:.4f}{', ' + shown if shown else ''} "
          f"({point.elapsed_s:.1f} s); best so far: step {state.best.step}", flush=True)
    emit_event("eval", **point.model_dump())
    return best_weights


def selection_reason(state: TrainingState, select: str, selected: int, last_step: int, total_steps: int,
                     metric: str | None) -> str:
    """Which step's weights the stage returns and why, in one sentence (the `train.selection` tag)."""
    ended = f"step {last_step} of {total_steps}" + (" (early stopping)" if last_step < total_steps else "")
    if metric is None:
        return f"the last step's weights ({ended}); no held-out evaluations (train.eval_steps unset)"
    best = state.best
    value = selection_value(best, metric)
    described = f"{metric} {value:.4g}" + (f", eval loss {best.eval_loss:.4g}" if metric != "eval_loss" else "")
    steps = f"{len(state.evals)} evaluations, steps {state.evals[0].step}-{state.evals[-1].step}"
    if select == "last":
        return (f"train.select=last: the weights of {ended}; the best evaluation was step {best.step} "
                f"({described}) of {steps}")
    last = state.evals[-1]
    if selected == last.step:
        return f"train.select=best: step {selected} ({described}), the last of {steps}, was the best; {ended}"
    return (f"train.select=best: step {selected} ({described}) was the best of {steps}; the last, step "
            f"{last.step}, had {metric} {selection_value(last, metric):.4g}; trained to {ended}")


def _load_trainable(model, weights: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(root: Path, step, model, optimizer, scheduler, scaler, state: TrainingState, rank,
                     best_weights: dict | None = None) -> None:
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
        torch.save({name: p.detach() for name, p in model.named_parameters() if p.requires_grad},
                   partial / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   partial / "training.pt")
        (partial / "state.json").write_text(state.model_dump_json())
        partial.rename(final)
        for older in root.iterdir():  # only the newest (and the best it names) are needed to resume
            if older != final and older not in keep:
                shutil.rmtree(older, ignore_errors=True)
    _barrier(rank)


def _resume(root: Path, model, optimizer, scheduler, scaler, state: TrainingState) -> int:
    """Load the newest complete checkpoint, if any; returns its step (0 when starting fresh)."""
    import torch

    found = sorted((int(m.group(1)), path) for path in root.glob("step-*")
                   if (m := CHECKPOINT.fullmatch(path.name)))
    if not found:
        return 0
    step, path = found[-1]
    _load_trainable(model, torch.load(path / "trainable.pt", map_location="cpu"))
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


def _load_best(root: Path, state: TrainingState) -> dict | None:
    """The best evaluation's weights that a resumed state names (CPU tensors), or None."""
    import torch

    if state.best is None:
        return None
    return torch.load(root / BEST.format(step=state.best.step) / "trainable.pt", map_location="cpu")


def _save_output(model, tokenizer, out: Path, kind: str, request: TrainRequest) -> None:
    shutil.rmtree(out, ignore_errors=True)
    if kind == "full":
        from transformers import AutoConfig

        # Saved in the base model's own precision: the fp32 master weights were for training only.
        base_dtype = AutoConfig.from_pretrained(request.base.name_or_path, revision=request.base.revision).dtype
        if base_dtype is not None:
            model.to(base_dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from tasks.model.base import keep_tokenizer_sources

    keep_tokenizer_sources(request.base.name_or_path, out, request.base.revision)


# ------------------------------------------------------------------------------------- the preference phase


def sequence_logps(stepper, rows: list[dict]):
    """Summed log-probability of each row's labelled tokens (its answer), differentiable where grad is on.

    The base transformer runs once over the batch (packed as in SFT); the LM head runs at the answer positions
    only, a chunk at a time, each chunk's logits recomputed in the backward pass instead of kept.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from tasks.train.preference import HEAD_CHUNK, chunk_logps

    batch = make_batch(rows, stepper.packing, stepper.pad_id, stepper.device, stepper.row_tokens)
    with torch.autocast(stepper.device.type, dtype=_dtype(stepper.precision), enabled=stepper.precision != "fp32"):
        hidden, head = loss_hidden(stepper.model, batch, stepper.backend)
        targets = batch["loss_targets"]
        parts = []
        for start in range(0, len(targets), HEAD_CHUNK):
            part = slice(start, start + HEAD_CHUNK)
            args = (hidden[part], head.weight, head.bias, targets[part])
            parts.append(checkpoint(chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_logps(*args))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return token_logps.new_zeros(len(rows)).index_add(0, batch["loss_example"], token_logps)


def reference_logps(stepper, sequences: list[dict], path: Path, from_base: bool, batch_size: int) -> dict[str, float]:
    """Log-probability of every sequence under the reference, by sequence id; what `path` holds is reused."""
    import contextlib

    import torch

    cached = json.loads(path.read_text()) if path.is_file() else {}
    missing = [row for row in sequences if row["id"] not in cached]
    if missing:
        model = stepper.model
        model.eval()
        # The base as reference: the same weights with the adapters off, no second copy of the model.
        off = model.disable_adapter() if from_base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), off:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                cached.update(zip((row["id"] for row in chunk), sequence_logps(stepper, chunk).tolist()))
        model.train()
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(cached))
        os.replace(partial, path)
        print(f"train: reference log-probabilities of {len(missing)} answers computed "
              f"({'base, adapters off' if from_base else 'the model as the phase starts'}), kept in {path}", flush=True)
    return {row["id"]: cached[row["id"]] for row in sequences}


@dataclass
class PreferenceRun:
    """What the phase shares with the SFT steps before it: the worker's model (in `stepper`), state, checkpoints."""

    cfg: TrainConfig
    stepper: Stepper
    rows: list[dict]  # the preference rows (phase_rows)
    out_dir: Path
    state: TrainingState
    first_step: int  # steps before the phase (SFT's)
    last_step: int
    resumed_from: int
    started: float  # perf_counter at training start, less the time of earlier runs (resume)
    from_base: bool  # the reference is the base: adapters disabled


def train_preference(run: PreferenceRun) -> None:
    """The preference steps `run.first_step + 1` … `run.last_step`, resumed from a checkpoint in that range."""
    import torch
    from transformers import get_scheduler

    from tasks.train.preference import dpo_loss, kl_rows, kto_loss, rejected_row

    cfg, pref, stepper = run.cfg, run.cfg.preference, run.stepper
    method = cfg.objective.removeprefix("sft+")
    model, rows, checkpoints = stepper.model, run.rows, run.out_dir / "checkpoints"
    optimizer = _optimizer(model, cfg.model_copy(update={"learning_rate": pref.learning_rate}))
    n_steps = run.last_step - run.first_step
    scheduler = get_scheduler(schedule_name(cfg), optimizer, num_warmup_steps=min(cfg.warmup_steps, n_steps // 10),
                              num_training_steps=n_steps)
    if run.resumed_from > run.first_step:  # the checkpoint holds this phase's optimizer and schedule
        _resume(checkpoints, model, optimizer, scheduler, stepper.scaler, run.state)

    if method == "kto":
        others = kl_rows(rows)
    else:  # chosen and rejected share the row's id: the rejected one is cached under its own
        others = [{**rejected_row(row), "id": row["id"] + "|rejected"} for row in rows]
    reference = reference_logps(stepper, rows + others, run.out_dir / "reference_logps.json", run.from_base,
                                pref.batch_size)
    partner = dict(zip((row["id"] for row in rows), others))
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = ExampleOrder(len(rows), cfg.seed)
    model.train()
    tokens_since_log, last_log = 0, time.perf_counter()
    for step in range(max(run.resumed_from, run.first_step) + 1, run.last_step + 1):
        picked = [rows[i] for i in order.step(step - run.first_step, pref.batch_size)]
        matched = [partner[row["id"]] for row in picked]
        ref = torch.tensor([reference[row["id"]] for row in picked], device=stepper.device)
        ref_matched = torch.tensor([reference[row["id"]] for row in matched], device=stepper.device)
        if method == "kto":
            logps = sequence_logps(stepper, picked)
            with torch.no_grad():  # TRL computes the KL samples' log-probabilities without gradient
                kl_logps = sequence_logps(stepper, matched)
            desirable = torch.tensor([row["kind"] == "desirable" for row in picked], device=stepper.device)
            loss, metrics = kto_loss(logps, ref, desirable, kl_logps, ref_matched, pref.beta, pref.desirable_weight,
                                     pref.undesirable_weight)
        else:
            chosen, rejected = sequence_logps(stepper, picked + matched).split(len(picked))
            loss, metrics = dpo_loss(chosen, rejected, ref, ref_matched, pref.beta)
        stepper.scaler.scale(loss).backward()
        grad_norm = _finish_step(trainable, optimizer, scheduler, stepper.scaler, cfg.max_grad_norm,
                                 set_to_none=not stepper.gradients_in_graphs)
        tokens_since_log += sum(len(row["input_ids"]) for row in picked + matched)
        if step % cfg.logging_steps == 0 or step == run.last_step:
            now = time.perf_counter()
            cuda = stepper.device.type == "cuda"
            point = LossPoint(
                step=step, loss=float(loss), learning_rate=scheduler.get_last_lr()[0],
                grad_norm=round(float(grad_norm), 6), tokens_per_s=round(tokens_since_log / (now - last_log), 1),
                peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated(stepper.device) / 2**30, 3) if cuda else None,
                peak_gpu_reserved_gib=(round(torch.cuda.max_memory_reserved(stepper.device) / 2**30, 3)
                                       if cuda else None),
                elapsed_s=round(now - run.started, 3), phase=method, **metrics,
            )
            run.state.history.append(point)
            emit_event("step", **point.model_dump())
            tokens_since_log, last_log = 0, now
        if step % cfg.save_steps == 0 and step < run.last_step:
            run.state.elapsed_s = time.perf_counter() - run.started
            _save_checkpoint(checkpoints, step, model, optimizer, scheduler, stepper.scaler, run.state, stepper.rank)
