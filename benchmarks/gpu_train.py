"""Training speed on a CUDA GPU through tunepipe's own training worker, against the guides' recipe.

Every run is what the train stage runs: `run_worker("tasks.training:train_model", ...)`, one worker process
per configuration (so unsloth's patches never reach the next run). The model has Qwen3-0.6B's shape with
random weights (no download); its tokenizer comes from a folder with Qwen's 151,936-token vocabulary (e.g.
`.gpu/tok`: the tiny model's tokenizer from before it moved to GPT-2's vocabulary; it sets the LM head's size).

- long: 4 sequences of 2,048 random tokens a step, loss on every token, LoRA r=16 on all seven projections,
  bf16: the shape of shared/gpu/README.md's raw loops. Baselines in the same invocation (`raw_loop`): each
  library's own model, loss and checkpointing (unsloth's offloaded, transformers' plain), AdamW; then the
  worker with `gradient_checkpointing` auto (off when there is room), on, and offloaded.
- short: the demo's product-extraction data formatted by tunepipe's format stage (~115 tokens an example, loss
  on the answers): the guides' recipe (batch 2, accumulation 4, no packing) as the baseline in this run, then
  micro-batches of 64 examples (hf: packed rows; unsloth: length-sorted padding); tokens/s counts non-padding
  tokens.
- data parallel: the long batch with a global batch of 8 rows on one device and on two (`train.devices: 2`,
  the same worker under torchrun, 4 rows per device), for the scaling efficiency and the agreement of the losses.
- paths: QLoRA (4-bit base) with unsloth, and full fine-tuning with 8-bit AdamW (hf), a few steps each.
- profiles (`*-profile`): steps 6-7 of the worker and of the raw unsloth loop under torch's profiler;
  memory (`*-memory`): the blocks allocated at the peak of 6 steps, by the code that allocated them.
- out of memory, for real: the long batch at micro-batch 16 in a worker whose CUDA allocator is capped at
  MEMORY_CAP_GIB (`torch.cuda.set_per_process_memory_fraction`): the worker must halve the micro-batch until
  it fits and train on with the same effective batch.

tokens/s is the median over logged steps after the first WARMUP steps (compilation, autotuning); peak GiB is
torch.cuda.max_memory_allocated in the worker; seconds is the whole training loop including warm-up.

    python benchmarks/gpu_train.py --tokenizer .gpu/tok [--steps 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.train import LossPoint, TrainRequest, TrainResult  # noqa: E402

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True)
WARMUP = 5
LONG_TOKENS = 2048
MEMORY_CAP_GIB = 3.0


def train_under_memory_cap(request: TrainRequest) -> TrainResult:
    """The train stage's worker entry point, with this process's GPU memory capped at MEMORY_CAP_GIB."""
    import torch

    from tasks.training import train_model

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(MEMORY_CAP_GIB * 2**30 / total)
    return train_model(request)


def raw_loop(request: TrainRequest) -> TrainResult:
    """The baseline of shared/gpu/README.md: the library's own model, loss and checkpointing defaults
    (`model(input_ids, labels=input_ids).loss`, unsloth's offloaded checkpointing or transformers' own), AdamW,
    bf16; rows of the split in order, `batch_size` a step; each step timed to a CUDA synchronisation."""
    import time

    import torch

    cfg, lora = request.cfg, request.lora
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if cfg.backend == "unsloth":
        from unsloth import FastLanguageModel

        # unsloth loads a 4-bit base unless told otherwise: the same base as the worker's, for the same mode.
        model, _ = FastLanguageModel.from_pretrained(request.base.name_or_path, dtype=torch.bfloat16,
                                                     max_seq_length=request.model_cfg.max_seq_length,
                                                     load_in_4bit=cfg.mode == "qlora")
        model = FastLanguageModel.get_peft_model(model, r=lora.r, lora_alpha=lora.alpha, target_modules=targets,
                                                 use_gradient_checkpointing="unsloth")
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(request.base.name_or_path, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    model.train()  # from_pretrained leaves eval mode, in which neither library checkpoints
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    rows, history = request.data.rows(), []
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        ids = torch.tensor([r["input_ids"] for r in rows[(step - 1) * cfg.batch_size : step * cfg.batch_size]],
                           device="cuda")
        step_started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        now = time.perf_counter()
        history.append(LossPoint(step=step, loss=float(loss), learning_rate=cfg.learning_rate,
                                 tokens_per_s=round(ids.numel() / (now - step_started), 1),
                                 peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                                 elapsed_s=round(now - started, 3)))
    backend = "unsloth" if cfg.backend == "unsloth" else "hf"
    return TrainResult(adapter_dir=request.out_dir, kind="lora", backend=backend, loss_history=history, runtime_s=round(time.perf_counter() - started, 3),
                       trainable_params=sum(p.numel() for p in trainable),
                       total_params=sum(p.numel() for p in model.parameters()), steps=cfg.max_steps,
                       device=f"cuda ({torch.cuda.get_device_name()}) x1", precision="bf16",
                       micro_batch_size=cfg.batch_size, gradient_accumulation_steps=1, oom_retries=0,
                       resumed_from_step=0)


def profiled_training(request: TrainRequest) -> TrainResult:
    """The train stage's worker under torch's profiler (steps PROFILED): GPU busy time and the top kernels."""
    from tasks.training import train_model

    return _profiled(train_model, request)


def profiled_raw_loop(request: TrainRequest) -> TrainResult:
    return _profiled(raw_loop, request)


PROFILED = (6, 8)  # steps 6 and 7: warm, before the end


def _profiled(train, request: TrainRequest) -> TrainResult:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    first, end = PROFILED
    steps = end - first
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=first - 2, warmup=1, active=steps, repeat=1))
    register_optimizer_step_post_hook(lambda *_: profiler.step())  # both loops step one optimizer a step
    with profiler:
        result = train(request)
    events = profiler.key_averages()
    # Kernels only: the profiler's own step annotations are CUDA-side events too, spanning whole steps.
    kernels_ms = sum(e.self_device_time_total for e in events
                     if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep")) / 1000 / steps
    wall_ms = 1000 * (result.loss_history[end - 2].elapsed_s - result.loss_history[first - 2].elapsed_s) / steps
    (request.out_dir / "profile.txt").write_text(
        f"GPU kernels {kernels_ms:.1f} ms in {wall_ms:.1f} ms of wall time per step (steps {first}-{end - 1}, "
        "under the profiler)\n"
        + events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70) + "\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return result


def memory_of_training(request: TrainRequest) -> TrainResult:
    """The train stage's worker under the CUDA allocator's history: what is allocated at the peak, by site."""
    from tasks.training import train_model

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
    lines = [f"peak {peak / 2**30:.3f} GiB in {len(live)} blocks, at event {peak_at} of {len(events)}; the "
             f"allocation that reached it: {site(events[peak_at])}", "", "MiB     blocks  site"]
    lines += [f"{size / 2**20:8.1f} {blocks[name]:6d}  {name}" for name, size in by_site.most_common(30)]
    lines += ["", "largest blocks (MiB, site):"]
    lines += [f"{e['size'] / 2**20:8.1f}  {site(e)}" for e in sorted(live.values(), key=lambda e: -e["size"])[:20]]
    (request.out_dir / "memory.txt").write_text("\n".join(lines) + "\n")
    return result


def build_model(tokenizer_dir: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **QWEN3_0_6B)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def demo_split(model_cfg, work: Path):
    from tasks.base_model import resolve_base_model
    from tasks.config import DataConfig
    from tasks.demo_data import write_demo_dataset
    from tasks.format_data import format_dataset
    from tasks.load_data import load_dataset

    train, eval_ = write_demo_dataset(work / "data")
    loaded = load_dataset(DataConfig(train=train, eval=eval_, system_prompt="Extract the product as JSON."),
                          work / "loaded")
    return format_dataset(loaded.train_path, loaded.eval_path, resolve_base_model(model_cfg), model_cfg,
                          work / "formatted").train


def random_split(vocab_size: int, n_rows: int, path: Path):
    """Rows of LONG_TOKENS random tokens, every token trained: a plain language-modelling batch."""
    from tasks.format_data import FormattedSplit

    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(n_rows):
            ids = [rng.randrange(vocab_size) for _ in range(LONG_TOKENS)]
            out.write(json.dumps({"id": str(i), "input_ids": ids, "labels": ids}) + "\n")
    return FormattedSplit(path=path, n_rows=n_rows, n_tokens=n_rows * LONG_TOKENS,
                          n_trained_tokens=n_rows * LONG_TOKENS, max_tokens=LONG_TOKENS)


def run(name: str, split, model_cfg, work: Path, entry: str = "tasks.training:train_model", **train) -> dict:
    from tasks.base_model import resolve_base_model
    from tasks.config import LoraConfig, TrainConfig
    from tasks.worker import WorkerFailed, run_worker

    cfg = TrainConfig(**{"learning_rate": 2e-4, "warmup_steps": 2, "logging_steps": 1, "save_steps": 10_000,
                         **train})
    request = TrainRequest(data=split, base=resolve_base_model(model_cfg), model_cfg=model_cfg,
                           lora=LoraConfig(r=16, alpha=16), cfg=cfg, out_dir=work / name)
    try:
        result = run_worker(entry, request, TrainResult, request.out_dir, devices=cfg.devices)
    except WorkerFailed as failure:
        print(f"{name} failed: {failure}", file=sys.stderr)
        return {"name": name, "failed": str(failure)[-2000:]}
    rates = [p.tokens_per_s for p in result.loss_history[WARMUP:]] or [result.loss_history[-1].tokens_per_s]
    row = {
        "name": name, "backend": result.backend, "mode": cfg.mode, "packed": cfg.packing and result.backend == "hf",
        "batch": f"{cfg.batch_size}x{cfg.gradient_accumulation_steps}", "steps": result.steps,
        "tokens_per_s": round(statistics.median(rates)), "peak_gib": result.loss_history[-1].peak_gpu_memory_gib,
        "seconds": result.runtime_s, "loss": f"{result.loss_history[0].loss:.3f}->{result.loss_history[-1].loss:.3f}",
        "device": result.device, "precision": result.precision, "devices": cfg.devices,
        "oom_retries": result.oom_retries, "micro_batch_after": result.micro_batch_size,
        "checkpointing": cfg.gradient_checkpointing,
        "losses": [round(p.loss, 4) for p in result.loss_history],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="names of the runs to make (default: all)")
    args = parser.parse_args()
    from tasks.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(args.tokenizer, work / "model")
        long_cfg = ModelConfig(base=str(model), max_seq_length=LONG_TOKENS)
        short_cfg = ModelConfig(base=str(model), max_seq_length=512)
        long = random_split(151_936, 8 * args.steps, work / "long.jsonl")
        short = demo_split(short_cfg, work)
        plan = [
            ("long-unsloth", long, long_cfg, dict(backend="unsloth", batch_size=4)),
            ("raw-unsloth", long, long_cfg, dict(backend="unsloth", batch_size=4,
                                                 entry="benchmarks.gpu_train:raw_loop")),
            ("raw-hf", long, long_cfg, dict(backend="hf", batch_size=4, entry="benchmarks.gpu_train:raw_loop")),
            ("long-unsloth-profile", long, long_cfg, dict(backend="unsloth", batch_size=4, max_steps=10,
                                                          entry="benchmarks.gpu_train:profiled_training")),
            ("raw-unsloth-profile", long, long_cfg, dict(backend="unsloth", batch_size=4, max_steps=10,
                                                         entry="benchmarks.gpu_train:profiled_raw_loop")),
            ("raw-unsloth-memory", long, long_cfg, dict(backend="unsloth", batch_size=4, max_steps=6,
                                                        entry="benchmarks.gpu_train:memory_of_raw_loop")),
            ("long-unsloth-offload-memory", long, long_cfg, dict(backend="unsloth", batch_size=4, max_steps=6,
                                                                 gradient_checkpointing="offload",
                                                                 entry="benchmarks.gpu_train:memory_of_training")),
            ("long-unsloth-checkpointing", long, long_cfg, dict(backend="unsloth", batch_size=4,
                                                                gradient_checkpointing=True)),
            ("long-unsloth-offload", long, long_cfg, dict(backend="unsloth", batch_size=4,
                                                          gradient_checkpointing="offload")),
            ("long-hf", long, long_cfg, dict(backend="hf", batch_size=4)),
            ("raw-unsloth-qlora", long, long_cfg, dict(backend="unsloth", mode="qlora", batch_size=4,
                                                       entry="benchmarks.gpu_train:raw_loop")),
            ("long-unsloth-qlora", long, long_cfg, dict(backend="unsloth", mode="qlora", batch_size=4)),
            ("long-unsloth-oom", long, long_cfg, dict(backend="unsloth", batch_size=16, max_steps=6,
                                                      gradient_checkpointing=True,
                                                      entry="benchmarks.gpu_train:train_under_memory_cap")),
            # Data parallel: the same global batch of 8 x 2,048 tokens on one device and on two.
            ("long-hf-1dev", long, long_cfg, dict(backend="hf", batch_size=8)),
            ("long-hf-2dev", long, long_cfg, dict(backend="hf", batch_size=4, devices=2)),
            ("short-recipe-unsloth", short, short_cfg, dict(backend="unsloth", batch_size=2,
                                                            gradient_accumulation_steps=4, packing=False)),
            ("short-auto", short, short_cfg, dict(backend="auto", batch_size=64)),
            ("short-packed-hf", short, short_cfg, dict(backend="hf", batch_size=64)),
            ("short-qlora-unsloth", short, short_cfg, dict(backend="unsloth", mode="qlora", batch_size=64,
                                                           max_steps=8)),
            ("short-full-8bit-auto", short, short_cfg, dict(backend="auto", mode="full", optimizer="adamw_8bit",
                                                            batch_size=64, learning_rate=1e-5, max_steps=8)),
        ]
        rows = []
        for name, split, model_cfg, train in plan:
            if args.only and name not in args.only:
                continue
            rows.append(run(name, split, model_cfg, work, **{"max_steps": args.steps, **train}))
            for report in ("profile", "memory"):
                path = work / name / f"{report}.txt"
                if path.exists() and args.json:
                    shutil.copy(path, args.json.with_name(f"{name}-{report}.txt"))
            if args.json:  # after every run: a run cut short by a time limit keeps what finished
                args.json.write_text(json.dumps(rows, indent=2))
    print(f"{'run':<24}{'backend':<9}{'batch':>7}{'tokens/s':>10}{'peak GiB':>10}{'seconds':>9}  loss")
    for r in rows:
        if "failed" in r:
            print(f"{r['name']:<24}FAILED")
            continue
        print(f"{r['name']:<24}{r['backend']:<9}{r['batch']:>7}{r['tokens_per_s']:>10}{r['peak_gib']:>10}"
              f"{r['seconds']:>9}  {r['loss']}")


if __name__ == "__main__":
    main()
