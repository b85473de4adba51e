"""The worker process: a typed result comes back, and the worker leaves without its teardown; a crash or a kill
fails with the worker's own log tail; a worker started early (a spare) takes the next request for its target after
importing its module's stack."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydantic import BaseModel

from tunepipe.tasks.runtime import worker
from tunepipe.tasks.runtime.worker import WorkerFailed, prestart_worker, run_worker, spare_workers

pytestmark = pytest.mark.slow  # starts worker processes


class Request(BaseModel):
    text: str
    action: str = "echo"


class Result(BaseModel):
    text: str
    pid: int


def target(request: Request) -> Result:
    """Run inside the worker: echo, raise, or die by SIGKILL as a real OOM-killed trainer would."""
    print(f"worker got {request.text!r}")
    if request.action == "raise":
        raise RuntimeError("boom in the worker")
    if request.action == "raise-then-noise":  # like a rank's traceback followed by torchrun's long summary
        import sys
        import traceback

        try:
            raise ValueError("the root cause")
        except ValueError:
            traceback.print_exc()
        print("\n".join(f"launcher summary line {i}" for i in range(100)), file=sys.stderr)
        sys.exit(1)
    if request.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if request.action == "exit-hook":  # an exit hook, as torch and the other libraries register them
        import atexit

        atexit.register(Path(request.text).write_text, "the hook ran")
    return Result(text=request.text.upper(), pid=os.getpid())


def warm_up(settings: str) -> None:
    """Run by a spare before its request: says who warmed up, or dies as a broken import would."""
    if settings == "die":
        raise ImportError("a broken stack")
    print(f"warmed up with {settings!r} in {os.getpid()}")


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


def test_result_comes_back_from_another_process(tmp_path):
    result = run_worker("test_worker:target", Request(text="hi"), Result, tmp_path)
    assert result.text == "HI" and result.pid != os.getpid()
    assert "worker got 'hi'" in (tmp_path / "worker.log").read_text()


def test_the_worker_leaves_without_the_interpreters_teardown_once_its_result_is_written(tmp_path):
    """The stage does not wait for the worker's teardown (seconds, once a model was loaded): exit hooks don't run."""
    hook_ran = tmp_path / "exit-hook-ran"
    result = run_worker("test_worker:target", Request(text=str(hook_ran), action="exit-hook"), Result, tmp_path)
    assert result.text == str(hook_ran).upper()
    assert not hook_ran.exists()


def test_exception_fails_with_traceback_tail(tmp_path):
    with pytest.raises(WorkerFailed, match="exited with status 1") as failure:
        run_worker("test_worker:target", Request(text="x", action="raise"), Result, tmp_path)
    assert "RuntimeError: boom in the worker" in str(failure.value)
    assert not (tmp_path / "worker-result.json").exists()


def test_killed_worker_fails_naming_the_signal(tmp_path):
    with pytest.raises(WorkerFailed, match="killed by SIGKILL") as failure:
        run_worker("test_worker:target", Request(text="x", action="kill"), Result, tmp_path)
    assert failure.value.returncode == -signal.SIGKILL
    assert "worker got 'x'" in str(failure.value)


def test_first_traceback_is_kept_when_the_tail_is_noise(tmp_path):
    with pytest.raises(WorkerFailed) as failure:
        run_worker("test_worker:target", Request(text="x", action="raise-then-noise"), Result, tmp_path)
    message = str(failure.value)
    assert "first error:" in message and "ValueError: the root cause" in message
    assert "launcher summary line 99" in message and "launcher summary line 0\n" not in message


def _spare_processes():
    return [spare.process for spare in worker._spares]


def test_a_spare_takes_the_request_after_its_warm_up(tmp_path):
    with spare_workers():
        prestart_worker("test_worker:target", "fast")
        prestart_worker("test_worker:target", "fast")  # one spare per target and environment
        (spare,) = _spare_processes()
        result = run_worker("test_worker:target", Request(text="hi"), Result, tmp_path)
    assert result == Result(text="HI", pid=spare.pid)
    log = (tmp_path / "worker.log").read_text()
    assert f"warmed up with 'fast' in {spare.pid}" in log and "worker got 'hi'" in log
    assert spare.returncode == 0 and not _spare_processes()


def test_a_spare_from_another_environment_is_not_used_and_is_stopped_unused(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPIPE_TEST_SETTING", "as the spare starts")
    with spare_workers():
        prestart_worker("test_worker:target", "fast")
        (spare,) = _spare_processes()
        monkeypatch.setenv("TUNEPIPE_TEST_SETTING", "changed after the spare started")
        result = run_worker("test_worker:target", Request(text="hi"), Result, tmp_path)
        assert result.pid != spare.pid and spare.poll() is None
    assert spare.poll() is not None and not _spare_processes()


def test_a_variable_a_library_adds_after_the_spare_started_does_not_keep_it_from_the_request(tmp_path, monkeypatch):
    """Importing torch in the flow's process (the data check's tokenizer) sets KMP_DUPLICATE_LIB_OK and others."""
    monkeypatch.delenv("LIBRARY_TEST_ADDED", raising=False)
    with spare_workers():
        prestart_worker("test_worker:target", "fast")
        (spare,) = _spare_processes()
        monkeypatch.setenv("LIBRARY_TEST_ADDED", "True")
        assert run_worker("test_worker:target", Request(text="hi"), Result, tmp_path).pid == spare.pid


def test_a_tunepipe_switch_set_after_the_spare_started_keeps_it_from_the_request(tmp_path, monkeypatch):
    """`TUNEPIPE_PATCHES=off` set once the spare had imported would otherwise reach a process patched already."""
    monkeypatch.delenv("TUNEPIPE_PATCHES", raising=False)
    with spare_workers():
        prestart_worker("test_worker:target", "fast")
        (spare,) = _spare_processes()
        monkeypatch.setenv("TUNEPIPE_PATCHES", "off")
        assert run_worker("test_worker:target", Request(text="hi"), Result, tmp_path).pid != spare.pid


def test_a_spare_that_died_warming_up_gives_way_to_a_fresh_worker(tmp_path):
    with spare_workers():
        prestart_worker("test_worker:target", "die")
        (spare,) = _spare_processes()
        spare.wait(60)
        result = run_worker("test_worker:target", Request(text="hi"), Result, tmp_path)
    assert spare.returncode != 0 and result.pid != spare.pid and result.text == "HI"


def test_tunepipe_run_stops_its_training_spare_when_the_run_fails_before_the_flow(monkeypatch):
    import tunepipe.tasks.train.prestart
    from tunepipe.deployments import cli
    from tunepipe.tasks.runtime.config import load_config

    def no_server(early):
        raise RuntimeError("the Prefect server did not come up")

    monkeypatch.setattr(cli, "spawn_temporary_server", lambda: None)
    monkeypatch.setattr(cli, "usable_base_model", lambda cfg: True)
    monkeypatch.setattr(cli, "start_prefect", no_server)
    started = []

    def prestart_training(*settings):
        prestart_worker("test_worker:target", "fast")
        started.extend(_spare_processes())

    monkeypatch.setattr(tunepipe.tasks.train.prestart, "prestart_training", prestart_training)
    with pytest.raises(RuntimeError, match="did not come up"):
        cli.run_finetune(load_config("configs/demo.yaml"), unserved_status=0)
    assert started and not _spare_processes()
    assert all(process.poll() is not None for process in started)  # stopped, not only forgotten
