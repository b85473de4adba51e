"""Stopping `tunepipe run` for real while it trains: Ctrl-C (SIGINT to the terminal's process group), then
SIGTERM to the process alone (`kill PID`, a scheduler, a container stop). Each stop leaves no process behind
(worker, temporary Prefect server), marks the train stage and the flow run Crashed and the MLflow run FAILED;
the next run resumes training from the checkpoint the stopped one left."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Enough steps that a stop lands mid-training on an idle machine too, where the tiny model trains a handful of
# steps faster than the test can see a checkpoint and signal; a checkpoint every 5: room to stop a run twice.
STEPS, SAVE_STEPS = 200, 5
CLI = [sys.executable, "-c", "import sys; from tunepipe.deployments.cli import main; sys.exit(main())"]


class Stopped:
    """What one stopped run left: its exit status, the processes it had started, and the resume line if any."""

    def __init__(self, returncode: int, started: dict[int, str], still_running: dict[int, str], resumed: bool):
        self.returncode, self.started, self.still_running, self.resumed = returncode, started, still_running, resumed


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command line (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = command_line(child)
        todo += children.get(child, [])
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pids: dict[int, str]) -> dict[int, str]:
    """Those still running (a zombie has ended; a reused pid runs another command)."""
    running = {}
    for pid, command in pids.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and command_line(pid) == command:
            running[pid] = command
    return running


def newest_checkpoint(workdir: Path) -> int:
    steps = [
        int(p.name.removeprefix("step-"))
        for p in workdir.glob("train/*/checkpoints/step-*")
        if not p.name.endswith(".partial")
    ]
    return max(steps, default=0)


def stop_while_training(config: Path, env: dict[str, str], sig: signal.Signals, log: Path) -> Stopped:
    """Start `tunepipe run`, send `sig` once training has checkpointed past the newest checkpoint so far."""
    workdir = Path(yaml.safe_load(config.read_text())["workdir"])
    before = newest_checkpoint(workdir)
    with log.open("w") as out:
        # SIGINT as a terminal's process group has it: a shell starts background jobs (`nohup ... &`, some CI
        # runners) with it ignored, and Python then never raises KeyboardInterrupt.
        process = subprocess.Popen(
            [*CLI, "run", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 300
        while newest_checkpoint(workdir) <= before:
            assert process.poll() is None, f"the run ended before it was stopped:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no new checkpoint after 300 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        started = descendants(process.pid)
        (worker_log,) = workdir.glob("train/*/worker.log")
        resumed = "train: resuming from the checkpoint" in worker_log.read_text()
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)  # as a terminal sends Ctrl-C: to every process of the foreground group
        else:
            process.send_signal(sig)
        returncode = process.wait(timeout=120)
        time.sleep(1)  # the server's and the worker's last moments
        return Stopped(returncode, started, alive(started), resumed)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in alive(descendants(process.pid)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fast_config):
    root = tmp_path_factory.mktemp("stops")
    config = fast_config(root)
    config["train"].update(max_steps=STEPS, save_steps=SAVE_STEPS, logging_steps=5)
    config["export"]["gguf_types"] = ["f16"]
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # No PREFECT_API_URL: each run starts Prefect's temporary server, in a Prefect home of its own.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    interrupted = stop_while_training(path, env, signal.SIGINT, root / "interrupted.log")
    terminated = stop_while_training(path, env, signal.SIGTERM, root / "terminated.log")
    finished = subprocess.run([*CLI, "run", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return root, config, interrupted, terminated, finished


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_and_the_temporary_server(runs):
    _, _, interrupted, _, _ = runs
    commands = " ".join(interrupted.started.values())
    assert "tunepipe.tasks.runtime.worker" in commands and "uvicorn" in commands  # what there was to stop
    assert (interrupted.returncode, interrupted.still_running) == (130, {})


@pytest.mark.slow
def test_sigterm_stops_the_worker_and_the_temporary_server(runs):
    _, _, _, terminated, _ = runs
    commands = " ".join(terminated.started.values())
    assert "tunepipe.tasks.runtime.worker" in commands and "uvicorn" in commands
    assert (terminated.returncode, terminated.still_running) == (143, {})


@pytest.mark.slow
def test_each_stopped_run_is_marked_crashed_in_prefect(runs):
    root, _, _, _, _ = runs
    with sqlite3.connect(root / "prefect-home" / "prefect.db") as db:
        flows = [
            state
            for (state,) in db.execute(
                "select flow_run.state_name from flow_run join flow on flow.id = flow_run.flow_id "
                "where flow.name = 'finetune' order by flow_run.created"
            )
        ]
        trains = [
            state
            for (state,) in db.execute("select state_name from task_run where name like 'train%' order by created")
        ]
    # The last run trained and exported, but no Ollama answers here: "Unserved", a Completed state.
    assert flows == ["Crashed", "Crashed", "Unserved"] and trains == ["Crashed", "Crashed", "Completed"]


@pytest.mark.slow
def test_each_stopped_run_ends_failed_in_mlflow_with_the_reason(runs):
    from mlflow.tracking import MlflowClient

    _, config, _, _, _ = runs
    client = MlflowClient(tracking_uri=config["tracking"]["uri"])
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    parents = [
        run
        for run in client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
        if "mlflow.parentRunId" not in run.data.tags
    ]
    assert [run.info.status for run in parents] == ["FAILED", "FAILED", "FINISHED"]
    assert [parents[0].data.tags["error"].split(":")[0], parents[1].data.tags["error"].split(":")[0]] == [
        "KeyboardInterrupt",
        "TerminationSignal",
    ]


@pytest.mark.slow
def test_the_next_run_resumes_training_from_the_stopped_runs_checkpoint(runs):
    _, config, interrupted, terminated, finished = runs
    assert finished.returncode == 4, finished.stdout[-4000:] + finished.stderr[-4000:]  # trained, not served
    assert not interrupted.resumed and terminated.resumed
    (worker_log,) = Path(config["workdir"]).glob("train/*/worker.log")
    assert "train: resuming from the checkpoint" in worker_log.read_text()


def test_the_tunepipe_command_skips_the_interpreters_collection_at_exit_and_a_caller_of_main_keeps_its_own():
    """`tunepipe` (main() without arguments, as its script calls it) freezes the objects it made before it exits,
    so the interpreter's teardown does not collect them all; a program calling main(argv) is left as it was."""
    import gc

    from tunepipe.deployments.cli import main

    frozen = gc.get_freeze_count()
    assert main(["schema", "-o", os.devnull]) == 0 and gc.get_freeze_count() == frozen
    script = (
        "import gc, sys; from tunepipe.deployments.cli import main; status = main(); print(gc.get_freeze_count() > 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "schema", "-o", os.devnull],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.split()) == (0, ["True"]), done.stderr[-4000:]
