"""A 7-8B model, QLoRA, on the card users have: `tunepipe run` through train, evaluate and the gate with the
GPU memory capped (`model.gpu_memory_gib`, which caps every worker's CUDA allocator), and training tokens/s
against a plain Unsloth QLoRA loop under the same cap, same shape, batch and recomputation.

The model has Qwen2.5-7B's shape (7.6B parameters, 152,064-token vocabulary) with random weights, built on the
GPU from its config and saved in 4 GB safetensors shards (no download); its tokenizer is llama.cpp's Qwen2
vocabulary with ChatML (`ggml-vocab-qwen2.gguf`). The flow runs the demo's data and config with the settings
of `FLOW_SETTINGS`; a gate rule that cannot pass stops it before export (no llama-cpp-python on that machine).

Per cap it writes `flow-<cap>.log` (the CLI's output: the stage table), and one JSON line per measurement to
`results.jsonl`: each stage's seconds, the train stage's peak GPU memory and tokens/s (its worker result), the
evaluations during training (peak so far), the evaluate worker's peak, and the two training loops' tokens/s
and peak on 2 x 2,048 random tokens a step with plain recomputation (median after `gpu_train.WARMUP` steps).

    python benchmarks/gpu_qlora.py --tokenizer /tmp/vocab-qwen2.gguf --caps 24 16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.tasks.train.results import TrainResult
from tunepipe.tasks.train.task import TrainRequest

QWEN2_5_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
FLOW_SETTINGS = [
    "train.mode=qlora",
    "train.backend=auto",
    "model.max_seq_length=512",
    "train.max_steps=30",
    "train.batch_size=8",
    "train.learning_rate=2e-4",
    "train.eval_steps=15",
    "train.eval_samples=16",
    "eval.max_samples=32",
    "eval.batch_size=32",
    "eval.max_new_tokens=64",
    "gate.rules.eval_loss.max=0.001",
    "retrain.max_attempts=1",
    "export.gguf_types=[q4_k_m]",
]
BENCH_STEPS = 10
BENCH_BATCH = 2


def build_model(tokenizer_source: Path, out_dir: Path) -> Path:
    """Qwen2.5-7B's shape, random weights (transformers' own init, on the GPU, in bf16), 4 GB shards."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunepipe.tasks.demo.tiny_model import chatml_tokenizer

    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    tokenizer = chatml_tokenizer(tokenizer_source)
    config = Qwen2Config(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **QWEN2_5_7B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, max_shard_size="4GB")
    tokenizer.save_pretrained(out_dir)
    marker.write_text("")
    return out_dir


def raw_loop_capped(request: TrainRequest) -> TrainResult:
    """gpu_train's plain Unsloth loop with the process's GPU memory capped as a tunepipe worker caps its own."""
    from benchmarks.gpu_train import raw_loop
    from tunepipe.tasks.runtime.memory_plan import cap_gpu_memory

    cap_gpu_memory(request.model_cfg.gpu_memory_gib)
    return raw_loop(request)


def flow(model: Path, cap: float, out: Path) -> dict:
    workdir = Path(f"runs-cap{cap:g}")
    sets = [*FLOW_SETTINGS, f"model.base={model}", f"model.gpu_memory_gib={cap:g}", f"workdir={workdir}"]
    command = [
        sys.executable,
        "-c",
        "import sys; from tunepipe.deployments.cli import main; sys.exit(main())",
        "run",
        "configs/demo.yaml",
        *(arg for s in sets for arg in ("--set", s)),
    ]
    started = time.perf_counter()
    log = out / f"flow-{cap:g}.log"
    with log.open("w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode
    row = {"what": "flow", "cap_gib": cap, "exit": code, "seconds": round(time.perf_counter() - started, 1)}
    text = log.read_text(errors="replace")
    # The CLI's stage table: "│ stage │ state │ seconds │ ..." rows.
    row["stages"] = {m[1]: m[2] for m in re.finditer(r"│\s*(\w+)\s*│[^│\n]*│\s*([\d.]+)", text)}
    for result in workdir.glob("train/*/worker-result.json"):
        trained = json.loads(result.read_text())
        history = trained["loss_history"]
        rates = [p["tokens_per_s"] for p in history[5:] if p.get("tokens_per_s")]
        row["train"] = {
            "peak_gib": max((p["peak_gpu_memory_gib"] or 0) for p in history),
            "peak_reserved_gib": max((p["peak_gpu_reserved_gib"] or 0) for p in history),
            "tokens_per_s": round(statistics.median(rates)) if rates else None,
            "runtime_s": trained["runtime_s"],
            "micro_batch": trained["micro_batch_size"],
            "oom_retries": trained["oom_retries"],
            "backend": trained["backend"],
            "evals": [(e["step"], e["elapsed_s"], e.get("peak_gpu_memory_gib")) for e in trained["eval_history"]],
        }
    for worker_log in workdir.glob("evaluate/*/worker/*.log"):
        row["evaluate_lines"] = [
            line for line in worker_log.read_text(errors="replace").splitlines() if line.startswith("evaluate:")
        ]
    return row


def bench(model: Path, cap: float, work: Path) -> list[dict]:
    """tunepipe's training worker and the plain Unsloth loop, QLoRA, 2 x 2,048 random tokens, plain recomputation."""
    from benchmarks.gpu_train import random_split, run
    from tunepipe.tasks.runtime.config import ModelConfig

    model_cfg = ModelConfig(base=str(model), max_seq_length=2048, gpu_memory_gib=cap)
    split = random_split(QWEN2_5_7B["vocab_size"] - 512, BENCH_BATCH * BENCH_STEPS, work / "long.jsonl")
    same = dict(
        backend="unsloth", mode="qlora", batch_size=BENCH_BATCH, gradient_checkpointing=True, max_steps=BENCH_STEPS
    )
    rows = []
    for name, entry in (
        ("raw-unsloth-qlora", "benchmarks.gpu_qlora:raw_loop_capped"),
        ("tunepipe-qlora", "tunepipe.tasks.train.loop:train_model"),
    ):
        row = run(f"{name}-{cap:g}", split, model_cfg, work, entry=entry, **same)
        rows.append(
            {
                "what": "bench",
                "cap_gib": cap,
                **{
                    k: row.get(k)
                    for k in (
                        "name",
                        "tokens_per_s",
                        "peak_gib",
                        "peak_reserved_gib",
                        "seconds",
                        "oom_retries",
                        "micro_batch_after",
                        "step_tokens_per_s",
                        "failed",
                    )
                },
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--caps", type=float, nargs="+", default=[24, 16])
    parser.add_argument("--model", type=Path, default=Path("/tmp/qwen2.5-7b-shape"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with results.open("a") as sink:
            sink.write(json.dumps(row) + "\n")

    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, '.'); from pathlib import Path; "
            "from benchmarks.gpu_qlora import build_model; "
            f"build_model(Path('{args.tokenizer}'), Path('{args.model}'))",
        ],
        check=True,
    )
    record(
        {
            "what": "build",
            "seconds": round(time.perf_counter() - started, 1),
            "bytes": sum(p.stat().st_size for p in args.model.glob("*.safetensors")),
        }
    )
    from tunepipe.tasks.demo.data import write_demo_dataset

    write_demo_dataset(Path("runs/demo-assets/data"), n_eval=126)
    for cap in args.caps:
        record(flow(args.model, cap, args.out))
        if not args.skip_bench:
            work = Path(f"/tmp/bench-{cap:g}")
            work.mkdir(exist_ok=True)
            for row in bench(args.model, cap, work):
                record(row)


if __name__ == "__main__":
    main()
