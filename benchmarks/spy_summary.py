"""Where a run's seconds went, from a py-spy profile of it and its worker processes.

    py-spy record --idle --threads --subprocesses --format raw -r 25 -o flow.txt -- tunepipe run ...
    python benchmarks/spy_summary.py flow.txt --rate 25 --top 40

For each process, its main thread's seconds and the frames they were spent under (inclusive: a frame counts
once per sample however deep it recurs), and the seconds each process spent compiling Python source to bytecode
(modules imported without a usable `.pyc`), by the package that imported them.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

PROCESS = re.compile(r'process (\d+):"[^"]*"')  # the quoted command line may itself hold ';'


def samples(path: Path):
    """(pid, thread, frames, count) for each line of py-spy's raw (collapsed stack) output."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = PROCESS.sub(lambda m: f"process {m.group(1)}", stack).split(";")
        innermost = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
        rest = frames[innermost + 1 :]
        thread = rest.pop(0) if rest and rest[0].startswith("thread ") else "thread ?"
        yield frames[innermost].removeprefix("process "), thread, rest, int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=25, help="py-spy's sampling rate (-r)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    main_seconds: collections.Counter = collections.Counter()
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    compiling: collections.Counter = collections.Counter()
    for pid, thread, frames, count in samples(args.profile):
        if "MainThread" not in thread:
            continue
        main_seconds[pid] += count / args.rate
        names = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
        for name in dict.fromkeys(names):
            inclusive[pid][name] += count / args.rate
        if any("source_to_code" in name for name in names):
            loading = max(i for i, name in enumerate(names) if "SourceLoader.get_code" in name)
            importer = next((n for n in reversed(names[:loading]) if n.startswith("<module>")), "? (?)")
            compiling[(pid, importer.split("(")[1].split("/")[0].rstrip(")"))] += count / args.rate

    for pid, seconds in main_seconds.most_common():
        entry = next(name for name in inclusive[pid] if "<module>" in name or "main" in name)
        print(f"\n== process {pid}: main thread {seconds:.1f} s (entry {entry})")
        for name, spent in inclusive[pid].most_common(args.top):
            print(f"  {spent:7.1f} s  {name[:150]}")
        compiled = [(package, spent) for (p, package), spent in compiling.most_common() if p == pid]
        if compiled:
            total = sum(spent for _, spent in compiled)
            print(
                f"  compiling source to bytecode: {total:.1f} s ("
                + ", ".join(f"{package} {spent:.1f}" for package, spent in compiled[:6])
                + ")"
            )


if __name__ == "__main__":
    main()
