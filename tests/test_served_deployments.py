"""The deployments for real: a local Prefect server, `prefect deploy` of each deployment and `prefect deployment
ls` (the README's steps, each exiting 0), a process worker, and a `retrain-from-rag` run triggered with `prefect
deployment run`, on the tiny model. The slowest tests; every wait has a limit and the server and worker are
killed whatever happens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.demo.data import write_demo_rag_log

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(api: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """End a process and everything it started (its own session), politely first."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class Served:
    """A local `prefect server start` with the work pool and the `gpu` limit the README creates."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.logs = root, env, root / "logs"

    def prefect(self, *args: str, timeout_s: float = 120) -> str:
        done = subprocess.run([*PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self, *args: str, log: str) -> subprocess.Popen:
        return subprocess.Popen([*PREFECT, *args], cwd=REPO, env=self.env, stdout=(self.logs / log).open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def print_logs(self) -> None:
        for log in self.logs.iterdir():
            sys.stderr.write(f"--- {log.name} ---\n{log.read_text()[-6000:]}\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    served = Served(root, {
        **os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "results"), "TUNEPIPE_CHECKOUT": str(REPO),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",  # the CLI's tables unwrapped
    })
    served.logs.mkdir()
    server = served.start("server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
    try:
        wait_until_healthy(api, server, timeout_s=120)
        served.prefect("work-pool", "create", "tunepipe", "--type", "process")
        served.prefect("global-concurrency-limit", "create", "gpu", "--limit", "1")
        yield served
    except BaseException:
        served.print_logs()
        raise
    finally:
        stop(server)


def test_every_deployment_deploys_and_is_listed(served: Served):
    """The README's deployment steps, each exiting 0: `prefect deploy` per deployment, then `deployment ls`."""
    names = [d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]]
    for name in names:
        assert "successfully created" in served.prefect("--no-prompt", "deploy", "--name", name)
    listed = served.prefect("deployment", "ls")
    assert all(f"{name}/{name}" in listed for name in names), listed  # FLOW/DEPLOYMENT: each is named after its flow


def test_retrain_from_rag_runs_through_a_deployment_and_a_process_worker(served: Served, fast_config):
    root = served.root
    config = fast_config(root)
    config["rag"].update(sql_url=f"sqlite:///{root / 'rag.db'}", min_new_examples=5)
    write_demo_rag_log(root / "rag.db", n=8)
    worker = None
    try:
        served.prefect("--no-prompt", "deploy", "--name", "retrain-from-rag")
        served.prefect("deployment", "inspect", "retrain-from-rag/retrain-from-rag")
        worker = served.start("worker", "start", "--pool", "tunepipe", "--limit", "1", log="worker.log")
        output = served.prefect("deployment", "run", "retrain-from-rag/retrain-from-rag",
                                "--params", json.dumps({"config": config}), "--watch", "--watch-timeout", "480",
                                timeout_s=500)
        assert "Completed" in output, output
    except BaseException:
        served.print_logs()
        raise
    finally:
        if worker is not None:
            stop(worker)

    state = json.loads((root / "runs" / "rag" / "state.json").read_text())
    assert state["version"] == 1 and state["watermark"]["sql_key"] == [8]
    assert state["n_rag_trained"] == state["n_rag"] >= 5
