"""LoRA and QLoRA training speed on a CUDA GPU: the unsloth backend against the hf backend (the baseline).

Everything runs through tunepipe's own stages: the demo data, `format_dataset` with the model's chat
template, and `train_adapter` with `train.backend` set to each backend. The model has Qwen3-0.6B's shape
with random weights (no download); only its tokenizer comes from a folder (the tiny model's: the same
Qwen2 vocabulary). Each configuration runs in its own process, because importing unsloth patches
transformers for every model loaded after it.

    python benchmarks/gpu_train.py --tokenizer runs/demo-assets/tiny-qwen3 [--steps 40] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True)
RUNS = [("hf", False), ("unsloth", False), ("hf", True), ("unsloth", True)]
WARMUP_LOGS = 2  # logged steps (every 5th) left out of the steady-state rate


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


def prepare(tokenizer_dir: Path, work: Path, max_seq_length: int) -> Path:
    from tasks.base_model import resolve_base_model
    from tasks.config import DataConfig, ModelConfig
    from tasks.demo_data import write_demo_dataset
    from tasks.format_data import format_dataset
    from tasks.load_data import load_dataset

    train, eval_ = write_demo_dataset(work / "data")
    loaded = load_dataset(DataConfig(train=train, eval=eval_, system_prompt="Extract the product as JSON."),
                          work / "loaded")
    model_cfg = ModelConfig(base=str(build_model(tokenizer_dir, work / "model")), max_seq_length=max_seq_length)
    formatted = format_dataset(loaded.train_path, loaded.eval_path, resolve_base_model(model_cfg), model_cfg,
                               work / "formatted")
    (work / "formatted.json").write_text(formatted.model_dump_json())
    return work


def train_once(work: Path, backend: str, four_bit: bool, steps: int, batch_size: int, max_seq_length: int) -> dict:
    import torch

    from tasks.base_model import resolve_base_model
    from tasks.config import LoraConfig, ModelConfig, TrainConfig
    from tasks.format_data import FormattedData
    from tasks.train import train_adapter

    formatted = FormattedData.model_validate_json((work / "formatted.json").read_text())
    model_cfg = ModelConfig(base=str(work / "model"), max_seq_length=max_seq_length, load_in_4bit=four_bit)
    result = train_adapter(
        formatted, resolve_base_model(model_cfg), model_cfg, LoraConfig(r=16, alpha=16),
        TrainConfig(backend=backend, max_steps=steps, batch_size=batch_size, learning_rate=2e-4, logging_steps=5),
        work / f"run-{backend}-{'4bit' if four_bit else '16bit'}",
    )
    tokens_per_example = formatted.train.n_tokens / formatted.train.n_rows
    # Steady state: from the first logged step after warm-up (compilation, autotuning) to the last.
    warm, last = result.loss_history[WARMUP_LOGS], result.loss_history[-1]
    return {
        "backend": backend, "load_in_4bit": four_bit, "steps": steps, "batch_size": batch_size,
        "runtime_s": round(result.runtime_s, 2),
        "tokens_per_s": round((last.step - warm.step) * batch_size * tokens_per_example
                              / (last.elapsed_s - warm.elapsed_s)),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": result.loss_history[0].loss, "last_loss": result.loss_history[-1].loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--one", nargs=3, metavar=("WORK", "BACKEND", "FOUR_BIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        work, backend, four_bit = Path(args.one[0]), args.one[1], args.one[2] == "1"
        print(json.dumps(train_once(work, backend, four_bit, args.steps, args.batch_size, args.max_seq_length)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(args.tokenizer, Path(tmp), args.max_seq_length)
        results = []
        for backend, four_bit in RUNS:
            cmd = [sys.executable, __file__, "--tokenizer", str(args.tokenizer), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length),
                   "--one", str(work), backend, "1" if four_bit else "0"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{backend} 4bit={four_bit} failed:\n{done.stderr[-5000:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'backend':<9}{'4-bit':<7}{'tokens/s':>10}{'vs hf':>8}{'peak GiB':>10}{'seconds':>9}  loss first→last"
          "   (tokens/s: steady state after warm-up; seconds: whole training incl. warm-up)")
    for r in results:
        baseline = next((b for b in results if b["backend"] == "hf" and b["load_in_4bit"] == r["load_in_4bit"]), r)
        print(f"{r['backend']:<9}{str(r['load_in_4bit']):<7}{r['tokens_per_s']:>10}"
              f"{r['tokens_per_s'] / baseline['tokens_per_s']:>7.2f}x{r['peak_gib']:>10}{r['runtime_s']:>9}"
              f"  {r['first_loss']:.3f}→{r['last_loss']:.3f}")


if __name__ == "__main__":
    main()
