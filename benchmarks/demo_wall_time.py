"""Wall time of the demo as a newcomer sees it: first run, cached re-run, and a re-run with a changed threshold.

Each run is `tunepipe demo` in a fresh scratch folder with a fresh PREFECT_HOME (so the first run pays for
Prefect's database set-up, as on a new machine). The first run is the baseline the re-runs are compared to.

    .venv/bin/python benchmarks/demo_wall_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TUNEPIPE = Path(sys.executable).parent / "tunepipe"


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds `tunepipe ARGS` took, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run([str(TUNEPIPE), *args], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"tunepipe {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached re-runs to time (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as scratch:
        scratch = Path(scratch)
        shutil.copytree(REPO / "configs", scratch / "configs")
        env = {**os.environ, "PREFECT_HOME": str(scratch / "prefect-home")}
        first, first_output = timed(["demo"], scratch, env)
        cached = [timed(["demo"], scratch, env)[0] for _ in range(args.repeats)]
        threshold = timed(["demo", "--set", "gate.rules.valid_json_rate.min=0.8"], scratch, env)[0]

    print(first_output)  # the first run's own report: held-out metrics of base and candidate, the gate's decision

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'run':<44} {'seconds':>8} {'vs first':>9}")
    rows = [
        ("first run (baseline, cold: model, data, DB)", first),
        (f"cached re-run (median of {args.repeats})", statistics.median(cached)),
        ("re-run with a changed gate rule", threshold),
    ]
    for name, seconds in rows:
        print(f"{name:<44} {seconds:8.1f} {seconds / first:8.1%}")
    print(f"cached re-runs: {', '.join(f'{s:.1f}' for s in cached)}")


if __name__ == "__main__":
    main()
