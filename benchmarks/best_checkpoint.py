"""Best checkpoint: the held-out curve, the step chosen, and the final metrics against the last step.

A real instruct model, SmolLM2-135M-Instruct (from its packaged GGUF, as `model.base` takes it), learns the
demo's product extraction with LoRA r=16 on pages of three layouts and is judged on pages of the fourth
(`<ul>` lists), which training never shows. Two trainings with the same schedule (seed, steps, warm-up, rate),
each the train stage's worker (`tunepipe.tasks.train.loop`; unsloth on CUDA when installed, transformers + peft
elsewhere):
- `last`: `train.select: last`, all --steps, evaluated every --eval-steps: the whole held-out curve, and the
  last step's weights;
- `best`: `train.select: best` with `train.early_stopping` (patience --patience): it stops once field accuracy
  on the sampled prompts stalls and returns its best step. Its steps are the `last` run's first ones, so its
  evaluations repeat the start of that curve.
The evaluate stage (`tunepipe.tasks.evaluate.task`) then scores both returned models, and the base, on all
held-out pages.

    flock /tmp/tunepipe-cpu.lock .venv/bin/python benchmarks/best_checkpoint.py              # the CPU figures
    .venv/bin/python benchmarks/best_checkpoint.py --steps 250 --batch-size 16 --eval-steps 10 \\
        --eval-batch-size 64 --out runs-best-checkpoint-gpu                                 # on a GPU

Prints the curve and both models' metrics as Markdown tables (benchmarks/RESULTS.md, "Real models") and writes
them to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from tunepipe.tasks.data.format import format_dataset
from tunepipe.tasks.data.load import load_dataset
from tunepipe.tasks.demo.data import write_demo_dataset
from tunepipe.tasks.evaluate.task import evaluate_models
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.model.packaged import PACKAGED, packaged_gguf
from tunepipe.tasks.runtime.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, TrainConfig
from tunepipe.tasks.runtime.worker import run_worker
from tunepipe.tasks.train.results import HeldOut, TrainResult
from tunepipe.tasks.train.task import TrainRequest

MODEL = "smollm2-135m-instruct"
SYSTEM_PROMPT = "Extract the product from the HTML as a JSON object with name, price, category and manufacturer."
HELD_OUT_LAYOUT = "<ul"  # tasks/demo/data.py's fourth layout: a bullet list
SHOWN = ("field_accuracy", "exact_match", "valid_json_rate")


def write_data(out: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """Demo pages: train on three layouts, hold out the fourth (and, as always, every eval product name)."""
    train, eval_ = write_demo_dataset(out / "all", n_train=train_rows * 2, n_eval=eval_rows * 5)
    kept = {}
    for name, path, keep, n in (("train", train, False, train_rows), ("eval", eval_, True, eval_rows)):
        lines = [
            line
            for line in path.read_text().splitlines()
            if json.loads(line)["input"].startswith(HELD_OUT_LAYOUT) == keep
        ][:n]
        kept[name] = out / f"{name}.jsonl"
        kept[name].write_text("".join(line + "\n" for line in lines))
    return kept["train"], kept["eval"]


def train(request: TrainRequest) -> TrainResult:
    def show(event: dict) -> None:
        if event["event"] == "eval":
            shown = ", ".join(f"{m} {event['metrics'][m]:.3f}" for m in SHOWN if m in event["metrics"])
            print(
                f"  step {event['step']}: held-out loss {event['eval_loss']:.4f}, {shown} ({event['elapsed_s']:.1f} s)",
                flush=True,
            )

    return run_worker("tunepipe.tasks.train.loop:train_model", request, TrainResult, request.out_dir, on_event=show)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=16, help="prompts answered at each evaluation")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--eval-rows", type=int, default=48, help="held-out pages the evaluate stage answers")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--backend", default="auto", choices=["auto", "hf", "unsloth"])
    parser.add_argument("--base", help="SmolLM2's transformers folder or GGUF (default: the packaged GGUF)")
    parser.add_argument("--out", type=Path, default=Path("runs-best-checkpoint"))
    args = parser.parse_args()

    out = args.out.resolve()
    model_cfg = ModelConfig(
        base=args.base or str(packaged_gguf(MODEL)), chat_template=PACKAGED[MODEL].chat_template, max_seq_length=384
    )
    with warnings.catch_warnings():  # "q4_1: the rounding is trained": known, the model ships only so
        warnings.simplefilter("ignore")
        base = resolve_base_model(model_cfg)
    train_path, eval_path = write_data(out / "data", args.train_rows, args.eval_rows)
    data_cfg = DataConfig(train=train_path, eval=eval_path, system_prompt=SYSTEM_PROMPT, output_format="json")
    loaded = load_dataset(data_cfg, out / "loaded")
    formatted = format_dataset(loaded.train_path, loaded.eval_path, base, model_cfg, out / "formatted")
    eval_cfg = EvalConfig(max_samples=args.eval_rows, max_new_tokens=48, batch_size=args.eval_batch_size)
    held_out = HeldOut(
        loss_rows=formatted.eval,
        examples=loaded.eval_path,
        train_examples=loaded.train_path,
        metric="field_accuracy",
        output_format="json",
        max_new_tokens=eval_cfg.max_new_tokens,
        batch_size=eval_cfg.batch_size,
    )
    print(
        f"{formatted.train.n_rows} train pages, {formatted.eval.n_rows} held-out pages ({HELD_OUT_LAYOUT}> only), "
        f"{formatted.n_quarantined} too long",
        flush=True,
    )

    common = dict(
        backend=args.backend,
        mode="lora",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=2,
        save_steps=10_000,
        eval_steps=args.eval_steps,
        eval_samples=args.eval_samples,
        gradient_checkpointing=False,
        seed=42,
    )
    runs = {
        "last": TrainConfig(**common, select="last"),
        "best": TrainConfig(**common, select="best", early_stopping={"patience": args.patience}),
    }
    results = {}
    for name, cfg in runs.items():
        print(f"== train.select={name}", flush=True)
        started = time.perf_counter()
        trained = train(
            TrainRequest(
                data=formatted.train,
                base=base,
                model_cfg=model_cfg,
                lora=LoraConfig(r=16, alpha=32),
                cfg=cfg,
                out_dir=out / f"train-{name}",
                held_out=held_out,
            )
        )
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        report = evaluate_models(
            formatted,
            loaded.eval_path,
            loaded.train_path,
            trained,
            base,
            None,
            "",
            data_cfg,
            eval_cfg,
            out / f"evaluate-{name}",
            out / "reference",
        )
        results[name] = {
            "trained": json.loads(trained.model_dump_json()),
            "train_s": round(train_s, 1),
            "evaluate_s": round(time.perf_counter() - started, 1),
            "candidate": report.candidate.metrics,
            "base": report.base.metrics,
        }
        print(f"  {trained.selection}; {train_s:.0f} s training, device {trained.device}", flush=True)
    (out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
    )
    print_tables(results, args)


def print_tables(results: dict, args) -> None:
    curve = results["last"]["trained"]["eval_history"]
    print(
        f"\nHeld-out curve of `last` (answer metrics on {args.eval_samples} sampled prompts, the loss on every "
        "held-out page):\n"
    )
    print("| step | held-out loss | " + " | ".join(SHOWN) + " | seconds |")
    print("|---:|---:|" + "---:|" * len(SHOWN) + "---:|")
    for point in curve:
        print(
            f"| {point['step']} | {point['eval_loss']:.4f} | "
            + " | ".join(f"{point['metrics'][m]:.3f}" for m in SHOWN)
            + f" | {point['elapsed_s']:.1f} |"
        )
    print(f"\nThe returned models on all {args.eval_rows} held-out pages, scored by the evaluate stage:\n")
    print("| | base | select last | select best |")
    print("|---|---:|---:|---:|")
    for metric in (*SHOWN, "eval_loss"):
        row = [
            results["last"]["base"][metric],
            results["last"]["candidate"][metric],
            results["best"]["candidate"][metric],
        ]
        print(f"| {metric} | " + " | ".join(f"{value:.3f}" for value in row) + " |")
    last, best = results["last"], results["best"]
    print(f"| steps trained | | {last['trained']['steps']} | {best['trained']['steps']} |")
    print(f"| step returned | | {last['trained']['selected_step']} | {best['trained']['selected_step']} |")
    print(f"| training seconds (evaluations included) | | {last['train_s']} | {best['train_s']} |")
    print(f"\n`best`: {best['trained']['selection']}")


if __name__ == "__main__":
    main()
