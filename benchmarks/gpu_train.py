"""Training speed on a CUDA GPU through tunepipe's own training worker, against baselines of the same shape.

Every tunepipe run is what the train stage runs: `run_worker("tunepipe.tasks.train.loop:train_model", ...)`, one worker
process per configuration (so unsloth's patches never reach the next run); the levers run in worker processes
too, the baselines in processes of their own (below). The model has Qwen3-0.6B's shape with random weights (no
download); its tokenizer comes from a folder, or from llama.cpp's `ggml-vocab-qwen2.gguf` (Qwen's 151,936-token
vocabulary, which sets the LM head's size).

- long: 4 sequences of 2,048 random tokens a step, loss on every token, LoRA r=16 on all seven projections,
  bf16: the shape of shared/gpu/README.md's raw loops. The baseline (`raw-*`) is the loop each library's users
  write, `benchmarks/raw_loop.py` (the library's own model and loss, AdamW), run as a script of its own: no
  tunepipe module in its process; `raw-unsloth-none-worker` runs the same loop inside tunepipe's worker process,
  for what that process costs. Like for like, the raw loop and the worker run in groups of the same
  recomputation: none (`*-none`; the worker's `auto` chooses none when there is room), plain (`*-plain`,
  `*-checkpointing`) and offloaded to host memory (`*-offload`: unsloth's own in the raw loop, tunepipe's
  `tasks/train/recompute.py` in the worker). MFU = tokens/s x `lora_flops_per_token` / the dense bf16 peak. The
  worker replays its transformer from CUDA graphs on these rows (`train.cuda_graphs`, on by default); `*-eager`
  rows run it without.
- levers (`with_*`): Liger's fused RMSNorm / RoPE / SwiGLU kernels (hf), Liger's fused linear cross-entropy as
  the head, each decoder layer compiled by `torch.compile`, and each head chunk's softmax and gradient in one
  Triton kernel (`*-head-kernel`, benchmarks/head_kernel.py); the worker otherwise unchanged.
- short: the demo's product-extraction data formatted by tunepipe's format stage (~115 tokens an example, loss
  on the answers): the guides' recipe as the guides run it (`sft_recipe`: TRL's SFTTrainer on unsloth, batch 2,
  accumulation 4, lr 2e-4, LoRA r=16), tunepipe's loop at that batch, then micro-batches of 64 examples (hf:
  packed rows of at most 512 tokens; unsloth: one packed row through torch's varlen attention, in the run's one
  packed layout, replayed from CUDA graphs (`short-auto-eager`: without), or length-sorted padding with
  `packing: false`); tokens/s counts non-padding tokens.
- data parallel: the long batch with a global batch of 8 rows on one device and on two (`train.devices: 2`,
  the same worker under torchrun, 4 rows per device), for the scaling efficiency and the agreement of the losses.
- patches off (`*-patches-off-LIBRARY`): the default long and short rows (`long-unsloth`, `short-auto`) with
  `TUNEPIPE_PATCHES=LIBRARY` (`-all`: `off`) in their worker: that library's public path instead of tunepipe's
  patches of its private names (`tasks/patches/`), for what the public path costs.
- paths: QLoRA (4-bit base) with unsloth, and full fine-tuning with 8-bit AdamW (hf), a few steps each.
- profiles (`*-profile`): steps 6-7 of the worker and of the raw unsloth loop under torch's profiler;
  memory (`*-memory`): the blocks allocated at the peak of 6 steps, by the code that allocated them.
- out of memory, for real: the long batch at micro-batch 16 in a worker whose CUDA allocator is capped at
  MEMORY_CAP_GIB (`torch.cuda.set_per_process_memory_fraction`): the worker must halve the micro-batch until
  it fits and train on with the same effective batch.

tokens/s is the median over the steps after the first WARMUP (compilation, autotuning); peak GiB is
torch.cuda.max_memory_allocated in the run's process, reserved GiB torch.cuda.max_memory_reserved (what the allocator
held: it counts a CUDA graph's memory pool, whose tensors the allocated figure sees only while capturing);
seconds is the whole training loop including warm-up.

    python benchmarks/gpu_train.py --tokenizer ggml-vocab-qwen2.gguf [--steps 20] [--json results.json] [--only ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.tasks.train.results import LossPoint, TrainResult
from tunepipe.tasks.train.task import TrainRequest

QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
WARMUP = 5
LONG_TOKENS = 2048
RAW_SCRIPT = "benchmarks/raw_loop.py"  # a `run` entry: the raw loop as a script of its own, not in a worker
MEMORY_CAP_GIB = 3.0
# The `*-patches-off-*` rows: name suffix -> TUNEPIPE_PATCHES ("all" is the switch's "off").
PATCHES_OFF = {"unsloth": "unsloth", "torch": "torch", "transformers": "transformers", "all": "off"}


def train_under_memory_cap(request: TrainRequest) -> TrainResult:
    """The train stage's worker entry point, with this process's GPU memory capped at MEMORY_CAP_GIB."""
    import torch

    from tunepipe.tasks.train.loop import train_model

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(MEMORY_CAP_GIB * 2**30 / total)
    return train_model(request)


def raw_loop(request: TrainRequest) -> TrainResult:
    """`benchmarks/raw_loop.py`'s loop inside this worker process (the profiled, memory and capped rows, and
    `raw-unsloth-none-worker`); the `raw-*` rows run it as a script of its own (`run_raw_script`)."""
    from benchmarks.raw_loop import train

    return raw_result(request, train(**raw_arguments(request)))


def raw_arguments(request: TrainRequest) -> dict:
    """The request's settings in `raw_loop.train`'s terms: `train.gradient_checkpointing` picks the
    recomputation, so each raw row pairs with the worker row of the same setting: false none, true the
    library's plain recomputation, "offload" unsloth's offloaded one (its default)."""
    cfg, lora = request.cfg, request.lora
    recompute = {False: "none", True: "plain", "offload": "offload"}.get(cfg.gradient_checkpointing)
    if recompute is None:
        raise ValueError("the raw loop needs gradient_checkpointing false, true or offload: a like-for-like pair")
    return {
        "model_dir": request.base.name_or_path,
        "rows_path": str(request.data.path),
        "backend": "unsloth" if cfg.backend == "unsloth" else "hf",
        "recompute": recompute,
        "batch": cfg.batch_size,
        "steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "max_seq_length": request.model_cfg.max_seq_length,
        "load_in_4bit": cfg.mode == "qlora",
        "r": lora.r,
        "alpha": lora.alpha,
        "seed": cfg.seed,
    }


def raw_result(request: TrainRequest, trained: dict) -> TrainResult:
    history = [
        LossPoint(
            step=p["step"],
            loss=p["loss"],
            learning_rate=request.cfg.learning_rate,
            tokens_per_s=p["tokens_per_s"],
            peak_gpu_memory_gib=p["peak_gib"],
            peak_gpu_reserved_gib=p["reserved_gib"],
            elapsed_s=p["elapsed_s"],
        )
        for p in trained["history"]
    ]
    return TrainResult(
        adapter_dir=request.out_dir,
        kind="lora",
        backend=trained["backend"],
        loss_history=history,
        runtime_s=trained["runtime_s"],
        trainable_params=trained["trainable_params"],
        total_params=trained["total_params"],
        steps=len(history),
        device=trained["device"],
        precision="bf16",
        micro_batch_size=trained["batch"],
        gradient_accumulation_steps=1,
        oom_retries=0,
        resumed_from_step=0,
    )


def run_raw_script(request: TrainRequest) -> TrainResult:
    """`benchmarks/raw_loop.py` as a user runs it: `python benchmarks/raw_loop.py ...`, its output in
    `raw_loop.log` beside the result."""
    import subprocess

    arguments = raw_arguments(request)
    command = [
        sys.executable,
        str(Path(__file__).with_name("raw_loop.py")),
        arguments.pop("model_dir"),
        arguments.pop("rows_path"),
    ]
    for name, value in arguments.items():
        if isinstance(value, bool):
            command += [f"--{name.replace('_', '-')}"] if value else []
        else:
            command += [f"--{name.replace('_', '-')}", str(value)]
    request.out_dir.mkdir(parents=True, exist_ok=True)
    output, log = request.out_dir / "raw_loop.json", request.out_dir / "raw_loop.log"
    with log.open("w") as sink:
        code = subprocess.run(
            [*command, "--json", str(output)], stdout=sink, stderr=subprocess.STDOUT, check=False
        ).returncode
    if code != 0 or not output.exists():
        raise RuntimeError(
            f"{' '.join(command)} exited with status {code}:\n"
            + "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        )
    return raw_result(request, json.loads(output.read_text()))


def sft_recipe(request: TrainRequest) -> TrainResult:
    """The guides' recipe as the guides run it: TRL's SFTTrainer on unsloth's model, LoRA on all seven
    projections with unsloth's offloaded recomputation, AdamW 8-bit (the guides' `optim`), linear schedule,
    no packing, loss on the answers only; a 16-bit base, as the worker's (the guides load 4-bit). The rows come
    pre-tokenized from tunepipe's format stage, with the answers as the completion mask: the same tokens and
    loss positions as the worker's. tokens/s counts the non-padding tokens of each optimizer step (the
    trainer's own count) over that step's time, synchronised."""
    import time

    import torch
    from datasets import Dataset
    from unsloth import FastLanguageModel  # before transformers and TRL: it patches them on import

    cfg, lora = request.cfg, request.lora
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, tokenizer = FastLanguageModel.from_pretrained(
        request.base.name_or_path,
        dtype=torch.bfloat16,
        max_seq_length=request.model_cfg.max_seq_length,
        load_in_4bit=cfg.mode == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=cfg.seed,
    )
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunepipe.tasks.data.format import IGNORE

    rows = request.data.rows()
    dataset = Dataset.from_list(
        [{"input_ids": r["input_ids"], "completion_mask": [int(t != IGNORE) for t in r["labels"]]} for r in rows]
    )
    history: list[LossPoint] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.started, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            now = time.perf_counter()
            self.tokens_per_s = (state.num_input_tokens_seen - self.seen) / (now - self.started)
            self.now = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append(
                    LossPoint(
                        step=state.global_step,
                        loss=logs["loss"],
                        learning_rate=logs.get("learning_rate", 0.0),
                        grad_norm=logs.get("grad_norm"),
                        tokens_per_s=round(self.tokens_per_s, 1),
                        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                        peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                        elapsed_s=round(self.now - started, 3),
                    )
                )

    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        callbacks=[StepTimer()],
        args=SFTConfig(
            output_dir=str(request.out_dir / "sft"),
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=cfg.seed,
            bf16=True,
            packing=False,
            completion_only_loss=True,
            report_to="none",
            save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0,
        ),
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return TrainResult(
        adapter_dir=request.out_dir,
        kind="lora",
        backend="unsloth",
        loss_history=history,
        runtime_s=round(time.perf_counter() - started, 3),
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        steps=cfg.max_steps,
        device=f"cuda ({torch.cuda.get_device_name()}) x1",
        precision="bf16",
        micro_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        oom_retries=0,
        resumed_from_step=0,
    )


def with_liger(request: TrainRequest) -> TrainResult:
    """A lever: the worker with Liger's fused RMSNorm, RoPE and SwiGLU kernels patched into transformers'
    Qwen3 (hf backend; the head stays tunepipe's chunked one)."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3

    apply_liger_kernel_to_qwen3(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    from tunepipe.tasks.train.loop import train_model

    return train_model(request)


def with_liger_head(request: TrainRequest) -> TrainResult:
    """A lever: the worker with Liger's fused linear cross-entropy (Triton) in place of tunepipe's chunked head
    (`tasks/train/head_loss.py`). Liger returns the summed loss only: the per-token losses, which the training step
    does not read, come back as NaN here."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from tunepipe.tasks.train import head_loss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def head_cross_entropy(hidden, head, targets, chunk):
        total = liger(head.weight, hidden.to(head.weight.dtype), targets, head.bias)
        return total, torch.full(targets.shape, float("nan"), device=targets.device)

    head_loss.head_cross_entropy = head_cross_entropy
    from tunepipe.tasks.train.loop import train_model

    return train_model(request)


def with_head_kernel(request: TrainRequest) -> TrainResult:
    """A lever: the worker with each LM-head chunk's losses and gradient from one Triton kernel over the 16-bit
    logits, in place (`benchmarks/head_kernel.py`), instead of torch's ops on an fp32 copy."""
    from benchmarks import head_kernel
    from tunepipe.tasks.train import head_loss

    head_loss.chunk_losses_and_gradient = head_kernel.losses_and_gradient
    from tunepipe.tasks.train.loop import train_model

    return train_model(request)


def with_repeated_kv_heads(request: TrainRequest) -> TrainResult:
    """A lever, the loop before it handed grouped K / V heads to flash attention as they are: unsloth's packed
    rows attend with each K / V head repeated for its group of query heads (`tunepipe.tasks.patches.torch`)."""
    from tunepipe.tasks.patches import torch as torch_patches
    from tunepipe.tasks.train.loop import train_model

    torch_patches.kernel_groups_kv_heads = lambda varlen_attn, device: False
    return train_model(request)


def with_compiled_layers(request: TrainRequest) -> TrainResult:
    """A lever: the worker with each decoder layer compiled by `torch.compile` (regional compilation: one
    graph, compiled once, reused by all 28 layers), fusing the elementwise kernels between the matmuls."""
    from tunepipe.tasks.train import loading
    from tunepipe.tasks.train.loop import train_model
    from tunepipe.tasks.train.stepper import causal_lm_of

    loaders = {name: getattr(loading, name) for name in ("load_hf", "load_unsloth")}

    def compiled(load):
        def load_and_compile(*args, **kwargs):
            model, tokenizer = load(*args, **kwargs)
            for layer in causal_lm_of(model).model.layers:
                layer.compile()
            return model, tokenizer

        return load_and_compile

    for name, load in loaders.items():
        setattr(loading, name, compiled(load))
    return train_model(request)


def with_liger_and_compiled_layers(request: TrainRequest) -> TrainResult:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3

    apply_liger_kernel_to_qwen3(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return with_compiled_layers(request)


def profiled_training(request: TrainRequest) -> TrainResult:
    """The train stage's worker under torch's profiler (steps PROFILED): GPU busy time and the top kernels."""
    from tunepipe.tasks.train.loop import train_model

    return _profiled(train_model, request)


def profiled_raw_loop(request: TrainRequest) -> TrainResult:
    return _profiled(raw_loop, request)


PROFILED = (6, 8)  # steps 6 and 7: warm, before the end


def _profiled(train, request: TrainRequest) -> TrainResult:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    first, end = PROFILED
    steps = end - first
    profiler = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=first - 2, warmup=1, active=steps, repeat=1),
    )
    register_optimizer_step_post_hook(lambda *_: profiler.step())  # both loops step one optimizer a step
    with profiler:
        result = train(request)
    events = profiler.key_averages()
    # Kernels only: the profiler's own step annotations are CUDA-side events too, spanning whole steps.
    kernels_ms = (
        sum(
            e.self_device_time_total
            for e in events
            if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep")
        )
        / 1000
        / steps
    )
    wall_ms = 1000 * (result.loss_history[end - 2].elapsed_s - result.loss_history[first - 2].elapsed_s) / steps
    (request.out_dir / "profile.txt").write_text(
        f"GPU kernels {kernels_ms:.1f} ms in {wall_ms:.1f} ms of wall time per step (steps {first}-{end - 1}, "
        "under the profiler)\n"
        + events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        + "\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    )
    return result


def memory_of_training(request: TrainRequest) -> TrainResult:
    """The train stage's worker under the CUDA allocator's history: what is allocated at the peak, by site."""
    from tunepipe.tasks.train.loop import train_model

    return _memory_at_peak(train_model, request)


def memory_of_raw_loop(request: TrainRequest) -> TrainResult:
    return _memory_at_peak(raw_loop, request)


def _memory_at_peak(train, request: TrainRequest) -> TrainResult:
    """Replays the allocator's trace to its peak and groups the blocks alive there by the innermost Python frame
    outside torch (or the autograd engine, which runs the backward pass without one)."""
    from collections import Counter

    import torch

    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    result = train(request)
    events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)

    def replay(until: int | None = None):
        live, total, peak, peak_at = {}, 0, 0, 0
        for i, event in enumerate(events[:until]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, i
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
        return live, peak, peak_at

    _, peak, peak_at = replay()
    live, _, _ = replay(peak_at + 1)

    def site(event) -> str:
        outside = [f for f in event.get("frames", []) if "/torch/" not in f["filename"]]
        if not outside:
            return "(no Python frame: the autograd engine)"
        frame = outside[0]
        return f"{'/'.join(frame['filename'].split('/')[-2:])}:{frame['line']} {frame['name']}"

    by_site, blocks = Counter(), Counter()
    for event in live.values():
        by_site[site(event)] += event["size"]
        blocks[site(event)] += 1
    lines = [
        f"peak {peak / 2**30:.3f} GiB in {len(live)} blocks, at event {peak_at} of {len(events)}; the "
        f"allocation that reached it: {site(events[peak_at])}",
        "",
        "MiB     blocks  site",
    ]
    lines += [f"{size / 2**20:8.1f} {blocks[name]:6d}  {name}" for name, size in by_site.most_common(30)]
    lines += ["", "largest blocks (MiB, site):"]
    lines += [f"{e['size'] / 2**20:8.1f}  {site(e)}" for e in sorted(live.values(), key=lambda e: -e["size"])[:20]]
    (request.out_dir / "memory.txt").write_text("\n".join(lines) + "\n")
    return result


def load_tokenizer(source: Path):
    """A tokenizer from a folder, or from a llama.cpp vocabulary file (`ggml-vocab-qwen2.gguf`: Qwen's
    vocabulary) with ChatML added."""
    from transformers import AutoTokenizer

    from tunepipe.tasks.demo.tiny_model import chatml_tokenizer

    return chatml_tokenizer(source) if source.suffix == ".gguf" else AutoTokenizer.from_pretrained(source)


def build_model(tokenizer_source: Path, out_dir: Path) -> Path:
    """Qwen3-0.6B's shape, random weights; the tokenizer from `load_tokenizer`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = load_tokenizer(tokenizer_source)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN3_0_6B,
    )
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def demo_split(model_cfg, work: Path):
    from tunepipe.tasks.data.format import format_dataset
    from tunepipe.tasks.data.load import load_dataset
    from tunepipe.tasks.demo.data import write_demo_dataset
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import DataConfig

    train, eval_ = write_demo_dataset(work / "data")
    loaded = load_dataset(
        DataConfig(train=train, eval=eval_, system_prompt="Extract the product as JSON."), work / "loaded"
    )
    return format_dataset(
        loaded.train_path, loaded.eval_path, resolve_base_model(model_cfg), model_cfg, work / "formatted"
    ).train


def random_split(vocab_size: int, n_rows: int, path: Path):
    """Rows of LONG_TOKENS random tokens, every token trained: a plain language-modelling batch."""
    from tunepipe.tasks.data.results import FormattedSplit

    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(n_rows):
            ids = [rng.randrange(vocab_size) for _ in range(LONG_TOKENS)]
            out.write(json.dumps({"id": str(i), "input_ids": ids, "labels": ids}) + "\n")
    return FormattedSplit(
        path=path,
        n_rows=n_rows,
        n_tokens=n_rows * LONG_TOKENS,
        n_trained_tokens=n_rows * LONG_TOKENS,
        max_tokens=LONG_TOKENS,
    )


# Dense bf16 peak of an H100 / H200 SXM (the same Hopper tensor cores), for the model FLOPs utilisation.
PEAK_BF16_FLOPS = 989e12


def lora_flops_per_token(config, seq: int) -> float:
    """The work a LoRA step does per token: forward 2N and the backward's input gradients 2N for the N weights of
    the linear layers and the head (frozen weights get no weight gradient; the adapters' own are negligible),
    plus causal attention (QK^T and AV, half the square, forward and two backward matmuls each)."""
    attn = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = config.hidden_size * (2 * attn + 2 * kv) + 3 * config.hidden_size * config.intermediate_size
    n = config.num_hidden_layers * per_layer + config.vocab_size * config.hidden_size
    attention = config.num_hidden_layers * 3 * 2 * seq * attn  # 2 matmuls x 2 FLOP x seq/2 keys, x3 with backward
    return 4 * n + attention


@contextlib.contextmanager
def patches_switched_off(libraries: str | None):
    """`TUNEPIPE_PATCHES=libraries` for the processes started inside (None: the environment as it is); yields
    the switch's value there. Each worker is a fresh process, so its `enabled` reads the switch afresh."""
    from tunepipe.tasks.patches import OFF_SWITCH

    before = os.environ.get(OFF_SWITCH)
    if libraries is not None:
        os.environ[OFF_SWITCH] = libraries
    try:
        yield os.environ.get(OFF_SWITCH)
    finally:
        if before is None:
            os.environ.pop(OFF_SWITCH, None)
        else:
            os.environ[OFF_SWITCH] = before


def run(
    name: str,
    split,
    model_cfg,
    work: Path,
    entry: str = "tunepipe.tasks.train.loop:train_model",
    flops_per_token: float | None = None,
    patches_off: str | None = None,
    **train,
) -> dict:
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import LoraConfig, TrainConfig
    from tunepipe.tasks.runtime.worker import WorkerFailed, run_worker

    cfg = TrainConfig(**{"learning_rate": 2e-4, "warmup_steps": 2, "logging_steps": 1, "save_steps": 10_000, **train})
    request = TrainRequest(
        data=split,
        base=resolve_base_model(model_cfg),
        model_cfg=model_cfg,
        lora=LoraConfig(r=16, alpha=16),
        cfg=cfg,
        out_dir=work / name,
    )
    started: dict = {}  # the worker's environment report: what `auto` resolved to
    try:
        with patches_switched_off(patches_off) as switch:
            if entry == RAW_SCRIPT:
                result = run_raw_script(request)
            else:
                result = run_worker(
                    entry,
                    request,
                    TrainResult,
                    request.out_dir,
                    devices=cfg.devices,
                    on_event=lambda e: started.update(e) if e["event"] == "started" else None,
                )
    except (WorkerFailed, RuntimeError) as failure:
        print(f"{name} failed: {failure}", file=sys.stderr)
        return {"name": name, "failed": str(failure)[-2000:]}
    rates = [p.tokens_per_s for p in result.loss_history[WARMUP:]] or [result.loss_history[-1].tokens_per_s]
    row = {
        "name": name,
        "backend": result.backend,
        "mode": cfg.mode,
        "packed": result.packed,
        "batch": f"{cfg.batch_size}x{cfg.gradient_accumulation_steps}",
        "steps": result.steps,
        "tokens_per_s": round(statistics.median(rates)),
        "peak_gib": result.loss_history[-1].peak_gpu_memory_gib,
        "peak_reserved_gib": result.loss_history[-1].peak_gpu_reserved_gib,
        "seconds": result.runtime_s,
        "loss": f"{result.loss_history[0].loss:.3f}->{result.loss_history[-1].loss:.3f}",
        "device": result.device,
        "precision": result.precision,
        "devices": cfg.devices,
        "oom_retries": result.oom_retries,
        "micro_batch_after": result.micro_batch_size,
        "checkpointing": cfg.gradient_checkpointing,
        "checkpointing_resolved": started.get("gradient_checkpointing"),
        "patches_off": switch,
        "losses": [round(p.loss, 4) for p in result.loss_history],
        "step_tokens_per_s": [round(p.tokens_per_s) for p in result.loss_history],
    }
    if flops_per_token:
        row["mfu"] = round(row["tokens_per_s"] * flops_per_token / PEAK_BF16_FLOPS, 4)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="names of the runs to make, in this order (default: all)")
    args = parser.parse_args()
    from tunepipe.tasks.runtime.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(args.tokenizer, work / "model")
        long_cfg = ModelConfig(base=str(model), max_seq_length=LONG_TOKENS)
        short_cfg = ModelConfig(base=str(model), max_seq_length=512)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        long = random_split(config.vocab_size, 8 * args.steps, work / "long.jsonl")
        short = "short"  # the demo's rows, formatted when the first short row runs
        demo = functools.cache(lambda: demo_split(short_cfg, work))
        raw, sft = RAW_SCRIPT, "benchmarks.gpu_train:sft_recipe"
        lever = "benchmarks.gpu_train:with_{}".format
        u4, h4 = dict(backend="unsloth", batch_size=4), dict(backend="hf", batch_size=4)  # the long batch
        plan = [
            # Like for like, long rows: each group shares its recomputation, precision and batch.
            # No recomputation (what `auto` chooses with room):
            ("raw-unsloth-none", long, long_cfg, dict(**u4, gradient_checkpointing=False, entry=raw)),
            (
                "raw-unsloth-none-worker",
                long,
                long_cfg,
                dict(**u4, gradient_checkpointing=False, entry="benchmarks.gpu_train:raw_loop"),
            ),
            ("raw-hf-none", long, long_cfg, dict(**h4, gradient_checkpointing=False, entry=raw)),
            ("long-unsloth", long, long_cfg, dict(**u4)),  # the default: auto
            ("long-unsloth-none", long, long_cfg, dict(**u4, gradient_checkpointing=False)),
            ("long-unsloth-eager", long, long_cfg, dict(**u4, cuda_graphs=False)),  # the default without graphs
            ("long-hf-eager", long, long_cfg, dict(**h4, gradient_checkpointing=False, cuda_graphs=False)),
            ("long-hf-none", long, long_cfg, dict(**h4, gradient_checkpointing=False)),
            # Plain recomputation (on the GPU):
            ("raw-unsloth-plain", long, long_cfg, dict(**u4, gradient_checkpointing=True, entry=raw)),
            ("raw-hf-plain", long, long_cfg, dict(**h4, gradient_checkpointing=True, entry=raw)),
            ("long-unsloth-checkpointing", long, long_cfg, dict(**u4, gradient_checkpointing=True)),
            ("long-hf-checkpointing", long, long_cfg, dict(**h4, gradient_checkpointing=True)),
            # Offloaded recomputation (the raw loop: unsloth's own, its default):
            ("raw-unsloth-offload", long, long_cfg, dict(**u4, gradient_checkpointing="offload", entry=raw)),
            ("long-unsloth-offload", long, long_cfg, dict(**u4, gradient_checkpointing="offload")),
            # Levers, no recomputation: fused kernels (Liger) and compiled layers.
            ("long-hf-liger", long, long_cfg, dict(**h4, gradient_checkpointing=False, entry=lever("liger"))),
            (
                "long-hf-compiled",
                long,
                long_cfg,
                dict(**h4, gradient_checkpointing=False, entry=lever("compiled_layers")),
            ),
            (
                "long-hf-liger-compiled",
                long,
                long_cfg,
                dict(**h4, gradient_checkpointing=False, entry=lever("liger_and_compiled_layers")),
            ),
            (
                "long-unsloth-liger-head",
                long,
                long_cfg,
                dict(**u4, gradient_checkpointing=False, entry=lever("liger_head")),
            ),
            # The next two against `long-unsloth`, in alternating order.
            ("long-unsloth-head-kernel", long, long_cfg, dict(**u4, entry=lever("head_kernel"))),
            ("long-unsloth-repeated-kv", long, long_cfg, dict(**u4, entry=lever("repeated_kv_heads"))),
            (
                "long-unsloth-compiled",
                long,
                long_cfg,
                dict(**u4, gradient_checkpointing=False, entry=lever("compiled_layers")),
            ),
            # Profiles and memory at the peak.
            (
                "long-unsloth-profile",
                long,
                long_cfg,
                dict(**u4, max_steps=10, entry="benchmarks.gpu_train:profiled_training"),
            ),
            (
                "raw-unsloth-profile",
                long,
                long_cfg,
                dict(**u4, gradient_checkpointing=False, max_steps=10, entry="benchmarks.gpu_train:profiled_raw_loop"),
            ),
            (
                "raw-unsloth-memory",
                long,
                long_cfg,
                dict(
                    **u4, gradient_checkpointing="offload", max_steps=6, entry="benchmarks.gpu_train:memory_of_raw_loop"
                ),
            ),
            (
                "raw-unsloth-none-memory",
                long,
                long_cfg,
                dict(**u4, gradient_checkpointing=False, max_steps=6, entry="benchmarks.gpu_train:memory_of_raw_loop"),
            ),
            (
                "long-unsloth-memory",
                long,
                long_cfg,
                dict(**u4, max_steps=6, entry="benchmarks.gpu_train:memory_of_training"),
            ),
            (
                "long-unsloth-offload-memory",
                long,
                long_cfg,
                dict(
                    **u4, max_steps=6, gradient_checkpointing="offload", entry="benchmarks.gpu_train:memory_of_training"
                ),
            ),
            # QLoRA (4-bit base), no recomputation on either side.
            ("raw-unsloth-qlora", long, long_cfg, dict(**u4, mode="qlora", gradient_checkpointing=False, entry=raw)),
            ("long-unsloth-qlora", long, long_cfg, dict(**u4, mode="qlora", gradient_checkpointing=False)),
            (
                "long-unsloth-oom",
                long,
                long_cfg,
                dict(
                    backend="unsloth",
                    batch_size=16,
                    max_steps=6,
                    gradient_checkpointing=True,
                    entry="benchmarks.gpu_train:train_under_memory_cap",
                ),
            ),
            # Data parallel: the same global batch of 8 x 2,048 tokens on one device and on two.
            ("long-hf-1dev", long, long_cfg, dict(backend="hf", batch_size=8)),
            ("long-hf-2dev", long, long_cfg, dict(backend="hf", batch_size=4, devices=2)),
            # Short rows, the demo's data. The guides' recipe as the guides run it (TRL's SFTTrainer on unsloth,
            # 2 x 4, lr 2e-4, LoRA r=16, unsloth's offloaded recomputation, AdamW 8-bit), then tunepipe's loop.
            (
                "sft-recipe-unsloth",
                short,
                short_cfg,
                dict(backend="unsloth", batch_size=2, gradient_accumulation_steps=4, seed=3407, entry=sft),
            ),
            (
                "short-recipe-unsloth",
                short,
                short_cfg,
                dict(backend="unsloth", batch_size=2, gradient_accumulation_steps=4, packing=False),
            ),
            ("short-auto", short, short_cfg, dict(backend="auto", batch_size=64)),  # unsloth, packed on Ampere+
            ("short-auto-eager", short, short_cfg, dict(backend="auto", batch_size=64, cuda_graphs=False)),
            (
                "short-auto-head-kernel",
                short,
                short_cfg,
                dict(backend="auto", batch_size=64, entry=lever("head_kernel")),
            ),
            ("short-padded-unsloth", short, short_cfg, dict(backend="unsloth", batch_size=64, packing=False)),
            ("short-packed-hf", short, short_cfg, dict(backend="hf", batch_size=64)),
            (
                "short-qlora-unsloth",
                short,
                short_cfg,
                dict(backend="unsloth", mode="qlora", batch_size=64, max_steps=8),
            ),
            (
                "short-full-8bit-auto",
                short,
                short_cfg,
                dict(
                    backend="auto", mode="full", optimizer="adamw_8bit", batch_size=64, learning_rate=1e-5, max_steps=8
                ),
            ),
        ]
        # tunepipe's defaults, long and short, through each library's public path instead of its patches.
        plan += [
            (f"{name}-patches-off-{suffix}", split, model_cfg, {**train, "patches_off": switch})
            for name, split, model_cfg, train in plan
            if name in ("long-unsloth", "short-auto")
            for suffix, switch in PATCHES_OFF.items()
        ]
        rows = []
        if args.only:  # in the order given, repeats allowed (A/B in alternating order): what matters most first,
            # in case a time limit cuts the call short
            by_name = {run[0]: run for run in plan}
            unknown = [name for name in args.only if name not in by_name]
            if unknown:
                parser.error(f"unknown runs: {', '.join(unknown)} (known: {', '.join(by_name)})")
            plan = [
                (f"{name}#{args.only[:i].count(name) + 1}" if args.only.count(name) > 1 else name, *by_name[name][1:])
                for i, name in enumerate(args.only)
            ]
        for name, split, model_cfg, train in plan:
            flops = lora_flops_per_token(config, LONG_TOKENS) if split is long else None
            split = demo() if split is short else split
            rows.append(run(name, split, model_cfg, work, flops_per_token=flops, **{"max_steps": args.steps, **train}))
            for report in ("profile", "memory"):
                path = work / name / f"{report}.txt"
                if path.exists() and args.json:
                    shutil.copy(path, args.json.with_name(f"{name}-{report}.txt"))
            if args.json:  # after every run: a run cut short by a time limit keeps what finished
                args.json.write_text(json.dumps(rows, indent=2))
    print(
        f"{'run':<40}{'backend':<9}{'batch':>7}{'packed':>7}{'tokens/s':>10}{'peak GiB':>10}{'reserved':>10}"
        f"{'seconds':>9}  loss"
    )
    for r in rows:
        if "failed" in r:
            print(f"{r['name']:<40}FAILED")
            continue
        print(
            f"{r['name']:<40}{r['backend']:<9}{r['batch']:>7}{str(r['packed']):>7}{r['tokens_per_s']:>10}"
            f"{r['peak_gib']:>10}{r['peak_reserved_gib']:>10}{r['seconds']:>9}  {r['loss']}"
        )
    # A run's speed moves between processes: repeated runs (`name#k`) are summed up by their median.
    repeats: dict[str, list[int]] = {}
    for r in rows:
        if "#" in r["name"] and "failed" not in r:
            repeats.setdefault(r["name"].split("#")[0], []).append(r["tokens_per_s"])
    for name, rates in repeats.items():
        print(
            f"{name:<40}median of {len(rates)} runs: {round(statistics.median(rates))} tokens/s "
            f"({', '.join(map(str, rates))})"
        )


if __name__ == "__main__":
    main()
