"""The deployments for real: a local Prefect server, `prefect deploy` of each deployment and `prefect deployment
ls` (docs/retraining.md's steps, each exiting 0), a process worker, and runs of `retrain-from-rag`, `finetune` and
`evaluate` triggered with `prefect deployment run`, on the tiny model, with the artifacts each leaves on its page.
The slowest tests; every wait has a limit and the server and worker are killed whatever happens."""

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

from tunepipe.tasks.demo.data import write_demo_rag_log

pytestmark = pytest.mark.slow  # starts a Prefect server and a process worker

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
    """A local `prefect server start` with the work pool and the `gpu` limit docs/retraining.md creates."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.logs = root, env, root / "logs"

    def prefect(self, *args: str, timeout_s: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            [*PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        assert done.returncode == 0 or not check, (
            f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def api(self, path: str, body: dict) -> list[dict]:
        """POST to the server's REST API (the UI's own calls)."""
        request = urllib.request.Request(
            self.env["PREFECT_API_URL"] + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def flow_runs(self, deployment: str) -> list[dict]:
        """The runs of a deployment that ended (not those its schedule has lined up)."""
        return self.api(
            "/flow_runs/filter",
            {
                "deployments": {"name": {"any_": [deployment]}},
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}},
            },
        )

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        """The artifacts a flow run left, by key: what its Artifacts tab shows."""
        found = self.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        for artifact in found:  # a table's rows are stored as JSON text
            if artifact["type"] == "table" and isinstance(artifact["data"], str):
                artifact["data"] = json.loads(artifact["data"])
        return {artifact["key"]: artifact for artifact in found if artifact["key"]}  # keyless: Prefect's result records

    def start(self, *args: str, log: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*PREFECT, *args],
            cwd=REPO,
            env=self.env,
            stdout=(self.logs / log).open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def print_logs(self) -> None:
        for log in self.logs.iterdir():
            sys.stderr.write(f"--- {log.name} ---\n{log.read_text()[-6000:]}\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    served = Served(
        root,
        {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "results"),
            "TUNEPIPE_CHECKOUT": str(REPO),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "TOKENIZERS_PARALLELISM": "false",
            "COLUMNS": "200",  # the CLI's tables unwrapped
        },
    )
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
    """docs/retraining.md's deployment steps, each exiting 0: `prefect deploy` per deployment, then `deployment ls`."""
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
        output = served.prefect(
            "deployment",
            "run",
            "retrain-from-rag/retrain-from-rag",
            "--params",
            json.dumps({"config": config}),
            "--watch",
            "--watch-timeout",
            "480",
            timeout_s=500,
        )
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

    # The nightly run's page shows how it ended, the finetune run's report, metrics and links.
    (run,) = served.flow_runs("retrain-from-rag")
    shown = served.artifacts(run["id"])
    prefix = "demo-products-retrain-from-rag-"
    assert set(shown) == {prefix + what for what in ("outcome", "report", "metrics", "mlflow-run", "served")}
    assert shown[prefix + "outcome"]["data"].startswith("# Nightly retrain: kept champion")
    assert "## Gate on the test split (attempt 1's candidate)" in shown[prefix + "report"]["data"]
    assert {row["metric"] for row in shown[prefix + "metrics"]["data"]} >= {"stop_rate", "eval_loss (lower is better)"}
    assert "not served" in shown[prefix + "served"]["data"] and ".gguf" in shown[prefix + "served"]["data"]
    finetune_runs = served.api("/artifacts/filter", {"artifacts": {"key": {"any_": ["demo-products-finetune-report"]}}})
    assert len(finetune_runs) == 1 and finetune_runs[0]["flow_run_id"] != run["id"]  # the finetune subflow's own


def test_a_finetune_run_that_fails_its_gate_shows_why_in_prefect_and_evaluate_runs_show_theirs(
    served: Served, fast_config
):
    """The UI's Run button on `finetune`: a run the gate stops ends Failed, with its report (the failing rule),
    metrics table and MLflow link on its page; an `evaluate` run of that model shows its own."""
    root = served.root / "gated"
    config = fast_config(root)
    config["gate"]["rules"] = {"eval_loss": {"max": 0.0}}  # no model reaches it
    worker = None
    try:
        for name in ("finetune", "evaluate"):
            served.prefect("--no-prompt", "deploy", "--name", name)
        worker = served.start("worker", "start", "--pool", "tunepipe", "--limit", "1", log="worker-gated.log")
        served.prefect(
            "deployment",
            "run",
            "finetune/finetune",
            "--params",
            json.dumps({"config": config}),
            "--watch",
            "--watch-timeout",
            "480",
            timeout_s=500,
            check=False,
        )
        (run,) = served.flow_runs("finetune")
        assert run["state"]["type"] == "FAILED", run["state"]
        shown = served.artifacts(run["id"])
        prefix = "demo-products-finetune-"
        assert set(shown) == {prefix + what for what in ("report", "metrics", "mlflow-run")}  # nothing served
        report = shown[prefix + "report"]["data"]
        assert "**Failed**" in report and "**FAIL**: eval_loss is" in report and "above the maximum 0" in report
        assert "![" not in report  # the plots are named: the UI cannot load report.md's PNGs
        metrics = {row["metric"]: row for row in shown[prefix + "metrics"]["data"]}
        assert set(metrics["stop_rate"]) == {"metric", "base", "candidate"}
        mlflow_link = shown[prefix + "mlflow-run"]["data"]
        mlflow_run_id = mlflow_link.split("(")[1].split(")")[0]
        assert len(mlflow_run_id) == 32 and "/artifacts" in mlflow_link

        served.prefect(
            "deployment",
            "run",
            "evaluate/evaluate",
            "--params",
            json.dumps({"config": config, "model": mlflow_run_id}),
            "--watch",
            "--watch-timeout",
            "300",
            timeout_s=320,
        )
        (evaluation,) = served.flow_runs("evaluate")
        shown = served.artifacts(evaluation["id"])
        prefix = "demo-products-evaluate-"
        assert set(shown) == {prefix + what for what in ("report", "metrics", "mlflow-run")}
        assert shown[prefix + "report"]["data"].startswith(f"# Evaluation of {mlflow_run_id}")
        assert "**FAIL**: eval_loss is" in shown[prefix + "report"]["data"]
    except BaseException:
        served.print_logs()
        raise
    finally:
        if worker is not None:
            stop(worker)
