"""Training speed on a CUDA GPU through tunepipe's own training worker, against the guides' recipe.

Every run is what the train stage runs: `run_worker("tasks.training:train_model", ...)`, one worker process
per configuration (so unsloth's patches never reach the next run). The model has Qwen3-0.6B's shape with
random weights (no download); its tokenizer comes from a folder (the tiny model's: the Qwen2 vocabulary).

- long: 4 sequences of 2,048 random tokens a step, loss on every token, LoRA r=16 on all seven projections,
  bf16, gradient checkpointing: the shape of shared/gpu/README.md's raw loops (unsloth 38,105 tokens/s, 1.92 GiB;
  transformers + peft 20,346 tokens/s).
- short: the demo's product-extraction data formatted by tunepipe's format stage (~115 tokens an example, loss
  on the answers): the guides' recipe (batch 2, accumulation 4, no packing) as the baseline in this run, then
  micro-batches of 64 examples (hf: packed rows; unsloth: length-sorted padding); tokens/s counts non-padding
  tokens.
- data parallel: the long batch with a global batch of 8 rows on one device and on two (`train.devices: 2`,
  the same worker under torchrun, 4 rows per device), for the scaling efficiency and the agreement of the losses.
- paths: QLoRA (4-bit base) with unsloth, and full fine-tuning with 8-bit AdamW (hf), a few steps each.

tokens/s is the median over logged steps after the first WARMUP steps (compilation, autotuning); peak GiB is
torch.cuda.max_memory_allocated in the worker; seconds is the whole training loop including warm-up.

    python benchmarks/gpu_train.py --tokenizer runs/demo-assets/tiny-qwen3 [--steps 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True)
WARMUP = 5
LONG_TOKENS = 2048


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


def run(name: str, split, model_cfg, work: Path, **train) -> dict:
    from tasks.base_model import resolve_base_model
    from tasks.config import LoraConfig, TrainConfig
    from tasks.train import TrainRequest, TrainResult
    from tasks.worker import WorkerFailed, run_worker

    cfg = TrainConfig(**{"learning_rate": 2e-4, "warmup_steps": 2, "logging_steps": 1, "save_steps": 10_000,
                         **train})
    request = TrainRequest(data=split, base=resolve_base_model(model_cfg), model_cfg=model_cfg,
                           lora=LoraConfig(r=16, alpha=16), cfg=cfg, out_dir=work / name)
    try:
        result = run_worker("tasks.training:train_model", request, TrainResult, request.out_dir, devices=cfg.devices)
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
            ("long-hf", long, long_cfg, dict(backend="hf", batch_size=4)),
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
