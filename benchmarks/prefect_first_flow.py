"""Time to a first flow: what tunepipe's Prefect patch (an early temporary server) saves a user, or costs.

Each run is a fresh Python process with a fresh PREFECT_HOME (so Prefect sets its database up, as on a new
machine) and no API configured. It starts Prefect as `tunepipe demo` and `tunepipe run` do
(`tunepipe.deployments.cli`: `spawn_temporary_server` first, then `start_prefect`, which imports the flows and
points Prefect at the server once it answers), then runs a trivial flow of one task. With the patch on, the
server's boot overlaps the imports; with `TUNEPIPE_PATCHES=prefect`, Prefect starts its own temporary server when
the flow first asks for a client. The training worker's early start and the MLflow store, which the CLI also
overlaps with the server's boot, are left out: this measures Prefect's part alone.

Timed from just before the process is started (interpreter start included) to the flow's completion, as
the process reports it on the system-wide monotonic clock, and to the process's exit (the exit handlers stop
the server). The two modes alternate, `--repeats` runs each; medians and every value are reported.

    .venv/bin/python benchmarks/prefect_first_flow.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "prefect-first-flow "  # the child's report line
MODES = {"patch on": None, "patch off": "prefect"}  # TUNEPIPE_PATCHES for each mode


def child() -> None:
    """The timed process: tunepipe's CLI path to Prefect, then a trivial flow."""
    from tunepipe.deployments import cli

    imported = time.monotonic()
    early = cli.spawn_temporary_server()
    cli.start_prefect(early)
    ready = time.monotonic()

    from prefect import flow, task

    @task
    def one() -> int:
        return 1

    @flow
    def first() -> int:
        return one()

    state = first(return_state=True)
    done = time.monotonic()
    report = {"cli_imported": imported, "prefect_ready": ready, "flow_done": done, "state": state.name}
    report |= {"early_server": early is not None, "tunepipe": str(Path(cli.__file__).resolve().parents[1])}
    print(MARK + json.dumps(report), flush=True)


def timed_run(mode: str, scratch: Path) -> dict:
    """One fresh process in `mode`: seconds from its start to each of its marks and to its exit."""
    home = Path(tempfile.mkdtemp(prefix="prefect-home-", dir=scratch))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.pop("TUNEPIPE_PATCHES", None)
    if MODES[mode]:
        env["TUNEPIPE_PATCHES"] = MODES[mode]
    env["PREFECT_HOME"] = str(home)
    log = home / "run.log"
    with log.open("w") as sink:
        started = time.monotonic()
        code = subprocess.run(
            [sys.executable, __file__, "--child"], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT
        ).returncode
        exited = time.monotonic()
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(MARK)]
    if code != 0 or not lines:
        sys.exit(f"{mode}: the process exited with status {code}:\n{log.read_text(errors='replace')[-3000:]}")
    report = json.loads(lines[-1][len(MARK) :])
    expected = ("Completed", MODES[mode] is None, REPO)  # this checkout's tunepipe, not another install's
    if (report["state"], report["early_server"], Path(report["tunepipe"])) != expected:
        sys.exit(f"{mode}: not what this mode runs: {report}\n{log.read_text(errors='replace')[-3000:]}")
    return {
        "to_cli_imported_s": round(report["cli_imported"] - started, 3),
        "to_prefect_ready_s": round(report["prefect_ready"] - started, 3),
        "to_flow_done_s": round(report["flow_done"] - started, 3),
        "to_exit_s": round(exited - started, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode, alternating (default 5)")
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="prefect-first-flow-") as scratch:
        for i in range(args.repeats):
            # Alternating, and which mode goes first alternates too: a drift in the machine's load hits both.
            for mode in list(MODES) if i % 2 == 0 else list(MODES)[::-1]:
                runs[mode].append(timed_run(mode, Path(scratch)))
                print(mode, json.dumps(runs[mode][-1]), flush=True)

    medians = {mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for mode, rows in runs.items()}
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.2f}; {args.repeats} runs each")
    print(f"{'median s from process start':<28}{'CLI imported':>14}{'Prefect ready':>15}{'flow done':>11}{'exit':>8}")
    for mode, median in medians.items():
        print(
            f"{mode:<28}{median['to_cli_imported_s']:>14.2f}{median['to_prefect_ready_s']:>15.2f}"
            f"{median['to_flow_done_s']:>11.2f}{median['to_exit_s']:>8.2f}"
        )
    on, off = medians["patch on"]["to_flow_done_s"], medians["patch off"]["to_flow_done_s"]
    print(f"patch off - patch on, to the flow's completion: {off - on:+.2f} s ({off / on:.2f}x)")
    for mode, rows in runs.items():
        print(f"{mode}, flow done: {', '.join(str(r['to_flow_done_s']) for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
