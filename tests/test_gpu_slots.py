"""The `gpu` global concurrency limit: two runs triggered at once never use the GPU at the same time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prefect import flow

from tunepipe.tasks.data.check import check_data
from tunepipe.tasks.data.format import format_data
from tunepipe.tasks.data.load import data_fingerprint, load_data
from tunepipe.tasks.evaluate.task import evaluate
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.config import PipelineConfig
from tunepipe.tasks.runtime.gpu_slots import GPU_LIMIT
from tunepipe.tasks.train.results import TrainResult
from tunepipe.tasks.train.task import train

pytestmark = pytest.mark.slow  # runs flows against a Prefect server


def prepared(cfg: PipelineConfig):
    base = resolve_base_model(cfg.model)
    loaded = load_data(cfg.data, data_fingerprint(cfg.data), cfg.workdir)
    checked = check_data(loaded, cfg.data, base, cfg.model, cfg.workdir)
    return base, checked, format_data(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)


@flow
def train_once(cfg: PipelineConfig, seed: int):
    base, _, formatted = prepared(cfg)
    # A different seed per run: two distinct trainings, neither a cache hit of the other.
    return train(formatted, base, cfg.model, cfg.lora, cfg.train.model_copy(update={"seed": seed}), cfg.workdir)


@flow
def evaluate_once(cfg: PipelineConfig, trained: TrainResult):
    base, checked, formatted = prepared(cfg)
    return evaluate(
        formatted, checked, trained, base, None, cfg.tracking.uri, cfg.data, cfg.eval, cfg.workdir, split="test"
    )


@pytest.fixture
def gpu_limit(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            yield
        finally:  # other tests share this server
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)


def slot_intervals(flow_run_id) -> list[tuple[float, float]]:
    """(held from, released at) of each `gpu` slot a flow run's tasks held, from the run's logs in the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=0,
            sort=LogSort.TIMESTAMP_ASC,
        )
    held = [log.timestamp.timestamp() for log in logs if log.message.startswith("holding")]
    released = [log.timestamp.timestamp() for log in logs if log.message.startswith("releasing")]
    return list(zip(held, released, strict=True))


def test_two_concurrent_runs_take_turns_on_one_gpu_slot(tmp_path: Path, fast_config, gpu_limit):
    from prefect.logging.handlers import APILogHandler

    raw = fast_config(tmp_path)
    raw["train"]["max_steps"] = 3
    cfg = PipelineConfig.model_validate(raw)
    train_once(cfg, seed=0)  # load, check and format once; the two runs below share those cache hits
    states = {}
    runs = [
        threading.Thread(target=lambda s=seed: states.update({s: train_once(cfg, s, return_state=True)}))
        for seed in (1, 2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=600)
    assert all(state.is_completed() for state in states.values())
    APILogHandler().flush()  # send the runs' logs to the API before reading them back

    (first,), (second,) = sorted(slot_intervals(state.state_details.flow_run_id) for state in states.values())
    assert first[0] < first[1] <= second[0] < second[1]  # the second run trained only after the first let go


def active_slots() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots


def task_started(flow_run_id, task_name: str) -> float:
    """When the flow run's task `task_name` entered Running, from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=100,
        )
    (run,) = [run for run in runs if run.name.rsplit("-", 1)[0] == task_name]  # names end in a random suffix
    return run.start_time.timestamp()


def test_an_evaluation_waits_for_another_runs_training(tmp_path: Path, fast_config, gpu_limit):
    from prefect.logging.handlers import APILogHandler

    raw = fast_config(tmp_path)
    raw["train"]["max_steps"] = 3
    cfg = PipelineConfig.model_validate(raw)
    trained = train_once(cfg, seed=0)  # the model to evaluate; and both runs below hit the data stages' cache
    states = {}
    # Long enough a training that the other run reaches its evaluation while the slot is still held.
    training = threading.Thread(
        target=lambda: states.update(
            train=train_once(
                cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 20})}), 1, return_state=True
            )
        )
    )
    training.start()
    deadline = time.monotonic() + 300
    while active_slots() == 0 and training.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    evaluation = threading.Thread(target=lambda: states.update(evaluate=evaluate_once(cfg, trained, return_state=True)))
    evaluation.start()
    for run in (training, evaluation):
        run.join(timeout=600)
    assert all(state.is_completed() for state in states.values())
    APILogHandler().flush()

    (training_slot,) = slot_intervals(states["train"].state_details.flow_run_id)
    (evaluation_slot,) = slot_intervals(states["evaluate"].state_details.flow_run_id)
    evaluation_started = task_started(states["evaluate"].state_details.flow_run_id, "evaluate")
    # The evaluation began while the other run trained, and got the GPU only once that training let go.
    assert evaluation_started < training_slot[1] <= evaluation_slot[0]


def test_without_the_limit_a_stage_asks_for_no_slot_and_says_so(prefect_server, monkeypatch, caplog):
    """No `gpu` limit: one read finds none and the stage runs, without the acquisition (a write the API's SQLite
    can refuse as busy right after a stage, which Prefect's client retries only after a back-off)."""
    import prefect.concurrency.sync

    from tunepipe.tasks.runtime.gpu_slots import gpu_slots

    def no_acquisition(*args, **kwargs):
        raise AssertionError("a slot was requested from a limit that does not exist")

    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", no_acquisition)
    ran = []

    @flow
    def stage():
        with gpu_slots():
            ran.append(True)

    stage()
    assert ran == [True]
    assert any("no concurrency limit 'gpu'" in record.getMessage() for record in caplog.records)


def test_with_the_limit_a_stage_holds_a_slot_while_it_runs(prefect_server, gpu_limit):
    from tunepipe.tasks.runtime.gpu_slots import gpu_slots

    held = []

    @flow
    def stage():
        with gpu_slots():
            held.append(active_slots())

    stage()
    assert held == [1] and active_slots() == 0
