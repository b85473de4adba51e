"""The plain training loop each library's users write: the baseline of benchmarks/gpu_train.py's `raw-*` rows.

It imports nothing of tunepipe. `gpu_train.py` runs it as a script, a process of its own, so the baseline holds
what a user's script holds (torch, the library, this loop) and nothing that tunepipe's worker process brings
along (Prefect's imports and the logging handlers they install, the benchmark's own modules).

- unsloth: `FastLanguageModel.from_pretrained` (16-bit, or 4-bit with `--load-in-4bit`) and `get_peft_model`
  (LoRA without dropout or bias: unsloth's fused LoRA kernels), `FastLanguageModel.for_training`;
- hf: transformers' `AutoModelForCausalLM` (SDPA attention) and peft's `get_peft_model`.

Both: the model's own loss from `labels` (every token trained; unsloth's is its chunked fused cross-entropy),
`loss.backward()`, torch's AdamW (fused on CUDA, as transformers' Trainer does by default there), one step per
`--batch` rows of a JSONL of token ids, taken in order. Each step is timed from its batch being on the GPU (as a
data loader's prefetch leaves it) to a CUDA synchronisation after the optimizer step.

`--recompute`: none; plain (the library's own recomputation of each layer); offload (unsloth's
`use_gradient_checkpointing="unsloth"`, which keeps the layers' inputs in host memory: its default).

    python benchmarks/raw_loop.py MODEL_DIR ROWS.jsonl --backend unsloth --batch 4 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECOMPUTE = ("none", "plain", "offload")


def load(
    model_dir: str, backend: str, recompute: str, max_seq_length: int, load_in_4bit: bool, r: int, alpha: int, seed: int
):
    import torch

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_dir, max_seq_length=max_seq_length, dtype=torch.bfloat16, load_in_4bit=load_in_4bit
        )
        checkpointing = {"none": False, "plain": True, "offload": "unsloth"}[recompute]
        model = FastLanguageModel.get_peft_model(
            model,
            r=r,
            lora_alpha=alpha,
            lora_dropout=0,
            bias="none",
            target_modules=PROJECTIONS,
            random_state=seed,
            use_gradient_checkpointing=checkpointing,
        )
        return FastLanguageModel.for_training(model)
    if recompute == "offload" or load_in_4bit:
        raise ValueError("the hf loop has no offloaded recomputation and no 4-bit base here")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    if recompute == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    model.train()  # from_pretrained leaves eval mode, in which neither library recomputes
    return model


def train(
    model_dir: str,
    rows_path: str,
    backend: str = "unsloth",
    recompute: str = "none",
    batch: int = 4,
    steps: int = 20,
    learning_rate: float = 2e-4,
    max_seq_length: int = 2048,
    load_in_4bit: bool = False,
    r: int = 16,
    alpha: int = 16,
    seed: int = 3407,
) -> dict:
    """Trains and returns each step's loss, tokens/s and peak memory, with the run's totals."""
    import torch

    model = load(model_dir, backend, recompute, max_seq_length, load_in_4bit, r, alpha, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, fused=True)
    with open(rows_path) as source:
        rows = [json.loads(line)["input_ids"] for line in source]
    history = []
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        ids = torch.tensor(rows[(step - 1) * batch : step * batch], device="cuda")
        step_started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        now = time.perf_counter()
        history.append(
            {
                "step": step,
                "loss": float(loss),
                "tokens_per_s": round(ids.numel() / (now - step_started), 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "elapsed_s": round(now - started, 3),
            }
        )
    return {
        "backend": backend,
        "recompute": recompute,
        "batch": batch,
        "history": history,
        "runtime_s": round(time.perf_counter() - started, 3),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "device": f"cuda ({torch.cuda.get_device_name()}) x1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("rows", help='JSONL, one row a line: {"input_ids": [...]}; every token is trained')
    parser.add_argument("--backend", choices=("unsloth", "hf"), default="unsloth")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--json", type=Path, required=True, help="where the result goes")
    args = parser.parse_args()
    result = train(
        args.model_dir,
        args.rows,
        args.backend,
        args.recompute,
        args.batch,
        args.steps,
        args.learning_rate,
        args.max_seq_length,
        args.load_in_4bit,
        args.r,
        args.alpha,
        args.seed,
    )
    args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
