"""Real pretrained models end to end: per model, base against candidate on held-out pages,
served-path parity per GGUF type, and seconds per stage.

Each model runs through tunepipe's own `finetune` flow, as `tunepipe run` runs it: a temporary Prefect
server, a fresh MLflow store and workdir, the packaged GGUF as `model.base` (dequantized into a transformers
folder once, in the shared cache), LoRA on the demo's product pages, the evaluate stage (base and candidate),
export of every GGUF type, and parity through the served path (Modelfile TEMPLATE and SYSTEM rendered by Go,
the GGUF's own vocabulary in llama.cpp). No Ollama is asked: the run ends `Unserved` after parity.

    .venv/bin/python benchmarks/real_models.py                                   # CPU, both models
    python benchmarks/real_models.py --device cuda --steps 100 --eval-rows 48 \
        --base smollm2-135m-instruct=/tmp/smollm2 --base gemma3-270m=/tmp/gemma3 # an offline GPU machine

`--base NAME=PATH` replaces a packaged model's GGUF (which set-up fetches) by another `model.base`: a GGUF,
or a transformers folder such as `benchmarks/carry_real_model.py unpack` rebuilds on a machine that cannot
reach the package index.
`--device cuda` leaves the choice of backend to `train.backend: auto`, which trains with unsloth where it is
installed (`pip install -e ".[gpu]"`); `--device cpu` hides any GPU, so unsloth is never imported.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYSTEM_PROMPT = "Extract the product from the HTML as a JSON object with name, price, category and manufacturer."
SHOWN = ("valid_json_rate", "field_accuracy", "exact_match", "stop_rate", "eval_loss")


def run_model(name: str, args: argparse.Namespace, root: Path) -> dict:
    """One `finetune` run of packaged model `name`; what it measured."""
    from tunepipe.deployments.output import stage_states
    from tunepipe.flows.finetune import finetune
    from tunepipe.tasks.demo.data import write_demo_dataset
    from tunepipe.tasks.export.parity import parity_verdicts
    from tunepipe.tasks.model.packaged import PACKAGED, packaged_gguf
    from tunepipe.tasks.runtime.config import PipelineConfig

    train, eval_ = write_demo_dataset(root / "data", args.train_rows, args.eval_rows)
    cfg = PipelineConfig.model_validate(
        {
            "name": f"bench-{name}",
            "workdir": str(root / "runs"),
            "data": {
                "train": str(train),
                "eval": str(eval_),
                "system_prompt": SYSTEM_PROMPT,
                "output_format": "json",
                "min_rows": min(100, args.train_rows),
            },
            "model": {
                "base": args.base.get(name) or str(packaged_gguf(name)),
                "chat_template": PACKAGED[name].chat_template,
                "max_seq_length": args.max_seq_length,
            },
            "lora": {"r": 16, "alpha": 32},
            "train": {
                "mode": "lora",
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "warmup_steps": 2,
                "logging_steps": 1,
                "save_steps": max(args.steps, 100),
                "gradient_checkpointing": False,
            },
            "eval": {
                "max_samples": args.eval_rows,
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.eval_batch_size,
            },
            "gate": {"rules": {}},  # measured, not gated: every model reaches export and parity
            "retrain": {"max_attempts": 1},
            "export": {"gguf_types": args.gguf_types, "lora_gguf": False},
            "ollama": {"model_name": f"bench-{name}", "host": "http://127.0.0.1:9"},  # nothing listens: Unserved
            "tracking": {
                "uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "real-models",
                "artifact_location": str(root / "mlartifacts"),
            },
        }
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*below q8_0")  # the packaged GGUFs are Q4: known
        state = finetune(cfg, return_state=True)
    wall = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"{name}: the flow ended {state.name}: {state.result(raise_on_failure=False)}")
    summary = state.result()
    verdicts = {v.gguf_type: v for v in parity_verdicts(summary.parity, summary.eval.candidate.metrics, cfg.export)}
    return {
        "summary": summary,
        "verdicts": verdicts,
        "wall_s": wall,
        "stages": stage_states(state.state_details.flow_run_id),
    }


def print_model(name: str, measured: dict) -> None:
    summary = measured["summary"]
    base, candidate = summary.eval.base.metrics, summary.eval.candidate.metrics
    print(f"\n### {name}: base vs candidate on {summary.eval.n_samples} held-out pages\n")
    print("| metric | base | candidate |\n|---|---:|---:|")
    for metric in SHOWN:
        print(f"| {metric} | {base.get(metric, float('nan')):.3f} | {candidate.get(metric, float('nan')):.3f} |")
    print(f"\n### {name}: served-path parity per GGUF type (PyTorch candidate first)\n")
    print(
        "| model | MB | vocabulary check | prompts whose served ids differ | "
        + " | ".join(SHOWN[:4])
        + " | within export.max_drop |"
    )
    print("|---|---:|---|---:|" + "---:|" * 4 + "---|")
    print("| PyTorch candidate | | | | " + " | ".join(f"{candidate.get(m, 0):.3f}" for m in SHOWN[:4]) + " | |")
    sizes = {g.type: g.bytes for g in summary.exported.ggufs}
    for scores in summary.parity.ggufs:
        verdict = measured["verdicts"][scores.gguf_type]
        print(
            f"| {scores.gguf_type} | {sizes[scores.gguf_type] / 1e6:.1f} | "
            f"{'passed' if scores.vocabulary_problem is None else scores.vocabulary_problem} | "
            f"{scores.prompt_mismatches} | "
            + " | ".join(f"{scores.scores.get(m, 0):.3f}" for m in SHOWN[:4])
            + f" | {'yes' if verdict.passed else 'no: ' + '; '.join(verdict.failures)} |"
        )
    print(f"\n### {name}: seconds per stage (flow wall time {measured['wall_s']:.0f} s)\n")
    print("| stage | state | seconds |\n|---|---|---:|")
    for stage, state, seconds in measured["stages"]:
        print(f"| {stage} | {state} | {seconds:.1f} |")
    print(f"\nGGUF that would be served: {summary.gguf_path.name}; run report: {summary.report.path}")


def main() -> None:
    from tunepipe.tasks.model.packaged import PACKAGED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PACKAGED), choices=list(PACKAGED))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=16, help="LoRA steps (default 16)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--train-rows", type=int, default=400, help="demo product pages written for training")
    parser.add_argument("--eval-rows", type=int, default=16, help="held-out pages, all of them evaluated")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=36)
    parser.add_argument("--max-seq-length", type=int, default=320)
    parser.add_argument("--gguf-types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="model.base for packaged model NAME instead of its GGUF (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    args.base = dict(item.split("=", 1) for item in args.base)

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported anywhere: every stage on the CPU
    from tunepipe.deployments.cli import spawn_temporary_server, start_prefect

    start_prefect(spawn_temporary_server())  # a temporary Prefect server, as `tunepipe run` starts one
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, GPU {gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="tunepipe-real-") as scratch:
        root = args.workdir or Path(scratch)
        for name in args.models:
            measured = run_model(name, args, root / name)
            print_model(name, measured)
            print(f"load average after {name}: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
