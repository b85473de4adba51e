"""Validation and test apart, on a real model: `tunepipe run` fine-tunes SmolLM2-135M-Instruct (the demo's model)
on product pages of three of the demo's HTML layouts; the best checkpoint and the retrain loop's choices read a
validation split of pages in the fourth layout, and the gate reads a test split of other pages in that layout.
The run report's metrics table then shows each model on both splits side by side.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/unseen_layouts.py --out /tmp/unseen-layouts

Writes the data and the config under --out, runs the finetune flow as `tunepipe run` does, and prints the
report's metrics table and each evaluation during training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

HELD_OUT_LAYOUT = "<ul"  # tasks/demo/data.py's fourth layout: a bullet list


def write_data(out: Path, train_rows: int, validation_rows: int, test_rows: int) -> dict[str, Path]:
    """Train on three layouts; validation and test are distinct pages (and products) of the fourth."""
    from tunepipe.tasks.demo.data import write_demo_dataset

    train, held = write_demo_dataset(out / "all", n_train=train_rows * 2, n_eval=(validation_rows + test_rows) * 5)
    train_lines = [
        line for line in train.read_text().splitlines() if not json.loads(line)["input"].startswith(HELD_OUT_LAYOUT)
    ][:train_rows]
    held_lines = [
        line for line in held.read_text().splitlines() if json.loads(line)["input"].startswith(HELD_OUT_LAYOUT)
    ]
    splits = {
        "train": train_lines,
        "validation": held_lines[:validation_rows],
        "test": held_lines[validation_rows : validation_rows + test_rows],
    }
    paths = {}
    for name, lines in splits.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(line + "\n" for line in lines))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--validation-rows", type=int, default=16)
    parser.add_argument("--test-rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=4, help="validation prompts answered per evaluation")
    parser.add_argument("--out", type=Path, default=Path("runs-unseen-layouts"))
    args = parser.parse_args()

    from tunepipe.deployments.cli import main as tunepipe
    from tunepipe.tasks.model.packaged import DEMO_MODEL, packaged_gguf

    out = args.out.resolve()
    paths = write_data(out / "data", args.train_rows, args.validation_rows, args.test_rows)
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config.update(name="unseen-layouts", workdir=str(out / "runs"))
    config.pop("rag")
    config["data"] = {
        **{k: v for k, v in config["data"].items() if k != "validation_fraction"},
        "train": str(paths["train"]),
        "validation": str(paths["validation"]),
        "eval": str(paths["test"]),
    }
    config["model"]["base"] = str(packaged_gguf(DEMO_MODEL))
    config["train"].update(max_steps=args.steps, eval_steps=args.eval_steps, eval_samples=args.eval_samples)
    config["eval"].update(max_samples=max(args.validation_rows, args.test_rows))
    config["export"] = {"gguf_types": ["q8_0"]}
    config["ollama"]["host"] = "http://127.0.0.1:9"  # nothing listens: the run ends Unserved after parity
    config["tracking"] = {
        "uri": f"sqlite:///{out}/mlflow.db",
        "experiment": "unseen-layouts",
        "artifact_location": str(out / "mlartifacts"),
    }
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"{len(paths)} splits under {out / 'data'}; config {config_path}", flush=True)

    started = time.perf_counter()
    status = tunepipe(["run", str(config_path)])
    print(f"tunepipe run: exit {status} after {time.perf_counter() - started:.1f} s", flush=True)
    reports = sorted((out / "runs" / "report").glob("*/report.md"), key=lambda p: p.stat().st_mtime)
    report = reports[-1].read_text()
    print(report[report.index("## Metrics") : report.index("![metrics")])
    curves = [json.loads(p.read_text()) for p in (out / "runs" / "train").glob("*/worker-result.json")]
    for curve in curves:
        print(f"selection: {curve['selection']}")
        for point in curve["eval_history"]:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(point["metrics"].items()) if "." not in k)
            print(f"  step {point['step']}: validation loss {point['eval_loss']:.4f}, {metrics}")


if __name__ == "__main__":
    main()
