"""Load + check + format of 100,000 rows on the CPU: wall time per stage and peak memory (target: ≤ 60 s).

Writes a JSONL file of product-extraction rows (the demo's generator; 1% of lines are broken JSON, so the
quarantine path is exercised), then runs the three data stages as a run does, in this process: load (parse,
normalise, split), check (the tiny model's tokenizer, GPT-2's vocabulary, and chat template for token lengths, the
Great Expectations suite, Data Docs; it keeps the clean examples' token ids) and format (token ids and
labels, from the check's token ids). Imports are counted in the stage that first needs them, as a user waits
for them. Baselines, in the same run: the format stage tokenizing every example again (as it did before the
check handed it the token ids), which must write the same files; and tokenizing the first 10,000 examples one
piece at a time (how the format stage tokenized before batching) against the batched tokenizer.

    .venv/bin/python benchmarks/data_100k.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.deployments.cli import QUIET_ENV

os.environ.update(QUIET_ENV)  # as `tunepipe run` and `tunepipe check` set it (tokenizers on one thread)

from tunepipe.tasks.chat.examples import read_examples
from tunepipe.tasks.data.check import check_dataset
from tunepipe.tasks.data.format import _pieces, format_dataset, tokenize_conversations
from tunepipe.tasks.data.load import load_dataset
from tunepipe.tasks.demo.data import MANUFACTURERS, _names, _row
from tunepipe.tasks.demo.tiny_model import CACHE_NAME, build_tiny_model
from tunepipe.tasks.integrations.llama_cpp import cache_root
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.base_model import load_tokenizer
from tunepipe.tasks.runtime.config import DataConfig, ModelConfig

BROKEN_EVERY = 100  # one line in a hundred is truncated JSON


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    catalogue = [(name, category, maker) for name, category in _names() for maker in MANUFACTURERS]
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for i in range(n):
            line = json.dumps(_row(rng, *catalogue[i % len(catalogue)]), ensure_ascii=False)
            out.write((line[: len(line) // 2] if i % BROKEN_EVERY == BROKEN_EVERY - 1 else line) + "\n")


def tokenize_one_piece_at_a_time(tokenizer, examples) -> list[list[int]]:
    """The format stage's tokenization before batching: one tokenizer call per rendered piece."""
    return [
        [i for text, _ in _pieces(tokenizer, e) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        for e in examples
    ]


@contextlib.contextmanager
def timed(times: dict[str, tuple[float, float]], stage: str) -> Iterator[None]:
    """Wall seconds and CPU seconds (user + system) of the block: on a shared machine the CPU time says
    what the stage costs without the other users' load; the wall time is what this run waited."""
    cpu = time.process_time()
    wall = time.perf_counter()
    yield
    times[stage] = (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, default=10_000)
    args = parser.parse_args()

    load_before = f"{os.getloadavg()[0]:.1f}"
    model = ModelConfig(base=str(build_tiny_model(cache_root() / CACHE_NAME)), max_seq_length=1024)
    with tempfile.TemporaryDirectory(prefix="tunepipe-data-bench-") as scratch:
        root = Path(scratch)
        write_rows(root / "train.jsonl", args.rows)
        cfg = DataConfig(train=root / "train.jsonl", system_prompt="Extract the product as JSON.", min_rows=100)
        times = {}
        with timed(times, "load"):
            loaded = load_dataset(cfg, root / "load")
        with timed(times, "check"):
            base = resolve_base_model(model)
            checked = check_dataset(loaded, cfg, base, model, root / "check")
        with timed(times, "format"):
            formatted = format_dataset(
                checked.train.clean_path, checked.eval.clean_path, base, model, root / "format", tokens=checked.tokens
            )
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        with timed(times, "format, tokenizing again (baseline)"):
            again = format_dataset(
                checked.train.clean_path, checked.eval.clean_path, base, model, root / "format-again"
            )
        for name in ("train", "eval"):
            path, path_again = getattr(formatted, name).path, getattr(again, name).path
            assert path.read_bytes() == path_again.read_bytes(), f"{name}: the check's token ids must format the same"

        examples = list(read_examples(checked.train.clean_path))[: args.baseline_rows]
        tokenizer = load_tokenizer(base)
        started = time.perf_counter()
        one_by_one = tokenize_one_piece_at_a_time(tokenizer, examples)
        t_one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        batched = [ids for ids, _ in tokenize_conversations(tokenizer, examples)]
        t_batched = time.perf_counter() - started
        assert batched == one_by_one, "batched tokenization must give the same ids"

    baseline_wall, baseline_cpu = times.pop("format, tokenizing again (baseline)")
    total_wall, total_cpu = (sum(t[i] for t in times.values()) for i in (0, 1))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f}"
    )
    print(
        f"rows read {checked.rows_read}, quarantined {checked.rows_quarantined}, "
        f"kept train {formatted.train.n_rows} / eval {formatted.eval.n_rows}, train tokens {formatted.train.n_tokens}"
    )
    print("| stage | wall s | CPU s |\n|---|---:|---:|")
    for stage, (wall, cpu) in times.items():
        print(f"| {stage} | {wall:.1f} | {cpu:.1f} |")
    print(f"| **load + check + format** | **{total_wall:.1f}** | **{total_cpu:.1f}** |")
    print(f"| format, tokenizing again (baseline; same files) | {baseline_wall:.1f} | {baseline_cpu:.1f} |")
    print(f"peak memory (max RSS of the process, during load + check + format): {peak_mib:,.0f} MiB")
    print(
        f"tokenizing {len(examples):,} examples: one piece at a time (baseline) {t_one_by_one:.2f} s, "
        f"batched {t_batched:.2f} s ({t_one_by_one / t_batched:.1f}x)"
    )


if __name__ == "__main__":
    main()
