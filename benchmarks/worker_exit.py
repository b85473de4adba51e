"""How long a model worker takes to end once its work is done: the interpreter's normal teardown against
`tunepipe.tasks.runtime.worker.exit_without_teardown`, in alternating order.

Each child process imports torch and transformers, loads a causal LM from MODEL_DIR, runs one forward pass,
prints the time and ends; the parent measures from that line to the child's exit, as `run_worker` waits for it.

    python benchmarks/worker_exit.py MODEL_DIR [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time
import torch
from transformers import AutoModelForCausalLM
from tunepipe.tasks.runtime.worker import exit_without_teardown
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3]]))
print(time.time(), flush=True)
if sys.argv[2] == "without-teardown":
    exit_without_teardown()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    seconds: dict[str, list[float]] = {"teardown": [], "without-teardown": []}
    for _ in range(args.repeats):
        for how, times in seconds.items():
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(args.model_dir), how],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            done = float(child.stdout.read().split()[-1])
            child.wait()
            times.append(round(time.time() - done, 3))
    for how, values in seconds.items():
        print(f"{how}: median {statistics.median(values):.3f} s of {values}")


if __name__ == "__main__":
    main()
