"""The LM head's cross-entropy alone on a CUDA GPU: the Triton kernel lever (`benchmarks/head_kernel.py`) against
the training loop's torch form (`head_loss.chunk_losses_and_gradient`), at the training benchmark's shape.

- kernel: one chunk of bf16 logits (positions x 151,936) through `cross_entropy_in_place`, for each
  (columns a block, warps) tried, against the torch form on the same chunk: losses and gradient.
- head: `head_cross_entropy` forward + backward over 8,192 positions of width 1,024 in the training loop's
  chunks (`chunk_positions`), a frozen bf16 weight (LoRA), each form: what the head costs a step.

Milliseconds are the median of REPEATS, each timed with CUDA events after WARMUP calls; for the head, also
the host's milliseconds to issue one call (timed from a synchronised start to the call's return: about the
GPU's time if the call waits for the GPU) and whether it synchronises (`torch.cuda.set_sync_debug_mode`).

    python benchmarks/head_loss.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, WIDTH, POSITIONS = 151_936, 1024, 8192
WARMUP, REPEATS = 3, 20
CONFIGS = [(32768, 32), (16384, 16), (8192, 8), (4096, 4), (8192, 16), (16384, 32)]  # (columns a block, warps)


def milliseconds(fn) -> float:
    import torch

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def host_milliseconds(fn) -> float:
    import time

    import torch

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    torch.cuda.synchronize()
    return round(statistics.median(times), 3)


def synchronises(fn) -> str | None:
    """The first operation in `fn` that makes the host wait for the GPU, or None."""
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        return str(error).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from benchmarks.head_kernel import cross_entropy_in_place, losses_and_gradient
    from tunepipe.tasks.runtime.memory_plan import chunk_positions
    from tunepipe.tasks.train import head_loss

    torch.manual_seed(0)
    chunk = chunk_positions(VOCAB, memory_is_tight=False)
    logits = torch.randn(chunk, VOCAB, device="cuda", dtype=torch.bfloat16) * 4
    targets = torch.randint(0, VOCAB, (chunk,), device="cuda")
    work = logits.clone()
    rows = [
        {
            "run": "torch form, one chunk",
            "positions": chunk,
            "ms": milliseconds(lambda: head_loss.chunk_losses_and_gradient(logits, targets, True)),
        }
    ]
    expected, expected_grad = head_loss.chunk_losses_and_gradient(logits, targets, True)
    copy_ms = milliseconds(lambda: work.copy_(logits))  # each kernel call below starts from a fresh copy
    for block, warps in CONFIGS:
        ms = milliseconds(lambda b=block, w=warps: cross_entropy_in_place(work.copy_(logits), targets, True, b, w))
        losses = cross_entropy_in_place(work.copy_(logits), targets, True, block, warps)
        rows.append(
            {
                "run": f"kernel, block {block}, {warps} warps, one chunk",
                "positions": chunk,
                "ms": round(ms - copy_ms, 3),
                "max_loss_diff": float((losses - expected).abs().max()),
                "max_grad_diff": float((work.float() - expected_grad.float()).abs().max()),
            }
        )
    gbytes = 3 * chunk * VOCAB * 2 / 1e9  # two reads and a write of the bf16 chunk
    for row in rows[1:]:
        row["gb_per_s"] = round(gbytes / (row["ms"] / 1000))

    head = torch.nn.Linear(WIDTH, VOCAB, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.02)
    head.weight.requires_grad_(False)
    hidden = torch.randn(POSITIONS, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    all_targets = torch.randint(0, VOCAB, (POSITIONS,), device="cuda")

    def step():
        total, _ = head_loss.head_cross_entropy(hidden, head, all_targets, chunk)
        total.backward()

    torch_form = head_loss.chunk_losses_and_gradient
    for form, name in ((losses_and_gradient, "kernel"), (torch_form, "torch form")):
        head_loss.chunk_losses_and_gradient = form
        rows.append(
            {
                "run": f"head forward + backward, {name}",
                "positions": POSITIONS,
                "ms": milliseconds(step),
                "host_ms": host_milliseconds(step),
                "synchronises": synchronises(step),
            }
        )
    head_loss.chunk_losses_and_gradient = torch_form
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
