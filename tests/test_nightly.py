"""What the unattended nightly loop meets, on the tiny model with a real Prefect server, each test asserting
what a fault leaves behind: the MLflow store down at the start, two triggers at once, and the evaluation's
worker killed mid-run. (Ollama dying mid-serve: tests/test_serving.py; GPU turns: tests/test_gpu_slots.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import closed_port

from tunepipe.deployments.output import stage_states
from tunepipe.tasks.runtime.config import PipelineConfig

pytestmark = pytest.mark.slow  # runs the nightly flows against a Prefect server


def small(raw: dict) -> dict:
    raw["export"].update(gguf_types=["f16"], lora_gguf=False)  # one conversion: these tests are about the loop
    return raw


def test_mlflow_unreachable_at_the_start_fails_clearly_before_any_stage(
    tmp_path: Path, fast_config, prefect_server, monkeypatch: pytest.MonkeyPatch
):
    from tunepipe.flows.finetune import finetune
    from tunepipe.tasks.runtime.tracking import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    raw = small(fast_config(tmp_path))
    uri = f"http://127.0.0.1:{closed_port()}"
    raw["tracking"]["uri"] = uri

    state = finetune(PipelineConfig.model_validate(raw), return_state=True)

    error = state.result(raise_on_failure=False)
    stages = [name for name, _, _ in stage_states(state.state_details.flow_run_id)]
    assert (isinstance(error, TrackingUnavailable), f"tracking.uri {uri}" in str(error), stages) == (
        True,
        True,
        ["resolve_base_model"],
    )


def test_a_store_is_opened_ahead_of_the_run_only_where_it_exists_and_an_unusable_one_is_left_to_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`tunepipe run` opens an existing SQLite tracking store while Prefect's server boots (tasks/runtime/
    tracking.py: `open_store`); a new one is left to the run (one that fails before any stage writes nothing),
    and one that cannot be used raises nothing there: `RunWriter.start` fails the run with TrackingUnavailable
    (the test above)."""
    from mlflow.tracking import MlflowClient

    from tunepipe.tasks.runtime import tracking
    from tunepipe.tasks.runtime.config import TrackingConfig

    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    tracking.open_store(TrackingConfig(uri=uri, experiment="e"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()
    MlflowClient(uri).search_experiments()  # the store a run made
    opened = []
    monkeypatch.setattr(
        tracking,
        "MlflowClient",
        lambda tracking_uri: opened.append(tracking_uri) or MlflowClient(tracking_uri=tracking_uri),
    )
    tracking.open_store(TrackingConfig(uri=uri, experiment="e"))
    assert opened == [uri]
    (tmp_path / "broken.db").write_text("not a database")
    tracking.open_store(TrackingConfig(uri=f"sqlite:///{tmp_path}/broken.db", experiment="e"))


def test_two_nightly_triggers_at_once_train_once(tmp_path: Path, fast_config, prefect_server):
    from tunepipe.flows.retrain import retrain
    from tunepipe.tasks.demo.data import write_demo_rag_log

    raw = small(fast_config(tmp_path))
    raw["rag"].update(sql_url=f"sqlite:///{tmp_path / 'rag.db'}", min_new_examples=3)
    write_demo_rag_log(tmp_path / "rag.db", n=6)
    cfg = PipelineConfig.model_validate(raw)
    states = {}
    triggers = [
        threading.Thread(target=lambda i=i: states.update({i: retrain(cfg, return_state=True)})) for i in range(2)
    ]
    for trigger in triggers:
        trigger.start()
    for trigger in triggers:
        trigger.join(timeout=600)

    # One trained (and kept the champion: no Ollama here); the other waited, then found nothing left.
    assert sorted(state.result().status for state in states.values()) == ["kept_champion", "nothing_to_do"]


def _kill_child_when_it_runs(marker: str, log_glob: str, root: Path, timeout_s: float = 300) -> None:
    """SIGKILL the first child process of this test whose command line holds `marker` (a worker we started),
    once a file matching `log_glob` under `root` exists: the stage's worker.log, opened when the worker has its
    request (a spare started early for the stage waits before that, and is not the one to kill)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(root.glob(log_glob)):
        time.sleep(0.05)
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            if parent == os.getpid() and marker in command:
                os.kill(int(entry.name), signal.SIGKILL)
                return
        time.sleep(0.05)


def test_worker_killed_during_evaluation_resumes_without_redoing_cached_stages(
    tmp_path: Path, fast_config, prefect_server
):
    from tunepipe.flows.finetune import finetune

    cfg = PipelineConfig.model_validate(small(fast_config(tmp_path)))
    killer = threading.Thread(
        target=_kill_child_when_it_runs,
        args=("tunepipe.tasks.evaluate.worker:generate_outputs", "**/evaluate/*/worker/worker.log", tmp_path),
    )
    killer.start()
    killed = finetune(cfg, return_state=True)
    killer.join()
    assert killed.is_failed()

    again = finetune(cfg, return_state=True)

    states = {name: state for name, state, _ in stage_states(again.state_details.flow_run_id)}
    assert {
        stage: states[stage] for stage in ("load_data", "check_data", "format_data", "train", "evaluate", "export")
    } == {
        "load_data": "Cached",
        "check_data": "Cached",
        "format_data": "Cached",
        "train": "Cached",
        "evaluate": "Completed",
        "export": "Completed",
    }


def test_nightly_with_a_preference_objective_trains_kto_on_the_rated_bad_answers(
    tmp_path: Path, fast_config, prefect_server
):
    """`train.objective: sft+kto` in the nightly flow: the RAG log's rated-bad answers (rated 2, at or below
    `max_bad_rating`) become undesirable rows of the snapshot, and training's KTO phase runs on them after SFT."""
    import json

    from mlflow.tracking import MlflowClient

    from tunepipe.flows.retrain import retrain
    from tunepipe.tasks.demo.data import write_demo_rag_log

    raw = small(fast_config(tmp_path))
    raw["rag"].update(sql_url=f"sqlite:///{tmp_path / 'rag.db'}", min_new_examples=3, max_bad_rating=2)
    raw["train"].update(objective="sft+kto", preference={"max_steps": 2, "batch_size": 8})
    write_demo_rag_log(tmp_path / "rag.db", n=20)

    outcome = retrain(PipelineConfig.model_validate(raw))

    assert outcome.status == "kept_champion", outcome.reason  # trained and gated; no Ollama to serve it
    preference = json.loads((outcome.snapshot.folder / "manifest.json").read_text())["preference"]
    assert preference["undesirable"] > 0 and preference["desirable"] > 0, preference
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.params["train.objective"] == "sft+kto"
    steps = lambda name: [m.step for m in client.get_metric_history(run.info.run_id, name)]  # noqa: E731
    assert (steps("train_loss"), steps("train_kto_loss")) == ([1, 2], [3, 4])  # 2 SFT steps, then 2 of KTO
    # The undesirable answers' KTO rewards: logged only for steps whose batch held rated-bad rows.
    assert client.get_metric_history(run.info.run_id, "rewards/rejected")
