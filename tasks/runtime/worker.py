"""Run a stage's model work in a process of its own, and read its typed result back.

Training and evaluation load models, CUDA state and (on a GPU) unsloth's patches; none of that may leak into
the flow's process or into the next stage. So such a stage writes its request as JSON, starts
`python -m tunepipe.tasks.runtime.worker MODULE:FUNCTION REQUEST RESULT` (or the same under torchrun for several
devices), streams the worker's output to the log and to `worker.log`, and reads the result JSON back. A worker that
dies (an exception, SIGKILL, out of memory) fails the stage with its exit status and the tail of its log; a
stage that is stopped (SIGTERM or Ctrl-C reaching the flow) stops its worker before it ends.

The target is a plain function taking one pydantic model and returning another, so it can also be called
in-process by tests. While it runs it may report progress with `emit_event` (one JSON line on stdout, rank 0
only); `run_worker` hands each event to `on_event` as it arrives, e.g. to log live metrics to MLflow.

Starting such a process is mostly importing the ML stack (torch, transformers, unsloth's patches: half a
minute on a GPU machine), so a stage that knows which worker comes next may start it early:
`prestart_worker(target, warm_up)` starts a process that imports the target's module, calls the module's
`warm_up(arg)` and then waits for its request on stdin. `run_worker` hands its request to such a spare when
one is waiting for the same target in the same folder, started with the environment the request would get,
else it starts a process as before; each request still gets a process of its own. `spare_workers()` stops the
spares nobody took. A worker that has written its result leaves at once, without the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

R = TypeVar("R", bound=BaseModel)
LOG_TAIL_LINES = 40
EVENT_PREFIX = "tunepipe-event "
# A worker that the stage before its own starts early, named here so that the earlier stage (train) need not
# import the later one's module.
EVALUATE_WORKER = "tunepipe.tasks.evaluate.worker:generate_outputs"


class WorkerFailed(RuntimeError):
    """The worker process ended without a result; the message carries its exit status and log tail."""

    def __init__(self, target: str, returncode: int, log_path: Path, tail: list[str], first_error: list[str] = ()):
        self.returncode = returncode
        self.log_path = log_path
        self.tail = tail
        if returncode < 0:
            how = f"was killed by {signal.Signals(-returncode).name}"
            if returncode == -signal.SIGKILL:
                how += " (out of host memory, preempted, or stopped by hand)"
        else:
            how = f"exited with status {returncode}"
        # Under torchrun the failing rank's traceback comes first and the launcher's summary last.
        cause = "" if not first_error or first_error[-1] in tail else "first error:\n" + "".join(first_error)
        super().__init__(f"{target} {how}; {cause}last lines of {log_path}:\n" + "".join(tail))


def run_worker(
    target: str,
    request: BaseModel,
    result_type: type[R],
    work_dir: Path,
    devices: int = 1,
    log: logging.Logger | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> R:
    """Run `target` ("module:function") on `request` in a new process; `devices` > 1 runs it under torchrun.

    Under torchrun every rank runs the function; rank 0 alone writes the result (see `main`).
    """
    log = log or logging.getLogger(__name__)
    work_dir.mkdir(parents=True, exist_ok=True)
    request_path, result_path, log_path = (
        work_dir / name for name in ("worker-request.json", "worker-result.json", "worker.log")
    )
    request_path.write_text(request.model_dump_json(indent=2))
    result_path.unlink(missing_ok=True)
    job = [str(request_path.resolve()), str(result_path.resolve())]

    spare = _hand_to_spare(target, job) if devices == 1 else None
    if spare is not None:
        log.info(
            "%s",
            started_early := f"worker for {target}: started {spare.age_s():.1f} s before its request "
            "(prestart_worker), its imports done while the stages before ran",
        )
        process = spare.process
    else:
        command = [sys.executable, "-m", "tunepipe.tasks.runtime.worker", target, *job]
        if devices > 1:
            command[1:3] = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={devices}",
                "-m",
                "tunepipe.tasks.runtime.worker",
            ]
        log.info("starting worker: %s", " ".join(command[1:]))
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_worker_env(), text=True, errors="replace"
        )
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    first_error: list[str] = []  # the first traceback, through its exception line
    with log_path.open("w", encoding="utf-8") as log_file, process:
        if spare is not None:
            log_file.write(started_early + "\n")
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                tail.append(line)
                _collect_first_traceback(first_error, line)
                if line.startswith(EVENT_PREFIX) and on_event is not None:
                    on_event(json.loads(line[len(EVENT_PREFIX) :]))
                elif line.strip():
                    log.info("%s", line.rstrip())
        except BaseException:  # the stage was stopped (SIGTERM, Ctrl-C) or failed: the worker must not outlive it
            stop_process(process)
            raise
    if process.returncode != 0 or not result_path.exists():
        raise WorkerFailed(target, process.returncode, log_path, list(tail), first_error)
    return result_type.model_validate_json(result_path.read_text())


def stop_process(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: a worker ends at once (torchrun passes SIGTERM on to its ranks)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _collect_first_traceback(lines: list[str], line: str) -> None:
    """Append `line` to `lines` from the first "Traceback" line until the unindented exception line after it."""
    done = len(lines) > 1 and not lines[-1].startswith((" ", "\t"))
    if done or len(lines) >= LOG_TAIL_LINES:
        return
    if lines or line.startswith("Traceback (most recent call last)"):
        lines.append(line)


@dataclass
class _Spare:
    target: str
    process: subprocess.Popen
    env: dict[str, str]
    cwd: str
    started: float

    def age_s(self) -> float:
        return time.monotonic() - self.started


_spares: list[_Spare] = []
_spares_lock = threading.Lock()


def prestart_worker(target: str, warm_up: str = "") -> None:
    """Start a worker for `target` now, to take the next `run_worker(target, ...)` request: it imports the
    target's module and runs the module's `warm_up(warm_up)` (when it has one) while the caller goes on."""
    env = _worker_env()
    with _spares_lock:
        if any(_serves(spare, target, env) for spare in _spares):
            return
        command = [sys.executable, "-m", "tunepipe.tasks.runtime.worker", "--wait", target, warm_up]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
        )
        _spares.append(_Spare(target, process, env, os.getcwd(), time.monotonic()))


def _serves(spare: _Spare, target: str, env: dict[str, str]) -> bool:
    """Whether `spare` may take a request for `target` that would run under `env` in this folder: every variable
    it was started with still has its value. Variables added since are allowed: they are what the libraries
    imported in the meantime set for themselves (importing torch sets KMP_DUPLICATE_LIB_OK, ...), which the
    spare's own imports set too; tunepipe's own (`TUNEPIPE_PATCHES`, ...) are not, so they must match."""
    ours = {name for name in env.keys() | spare.env.keys() if name.startswith("TUNEPIPE_")}
    return (
        spare.target == target
        and spare.cwd == os.getcwd()
        and all(env.get(name) == value for name, value in spare.env.items())
        and all(env.get(name) == spare.env.get(name) for name in ours)
    )


def _hand_to_spare(target: str, job: list[str]) -> _Spare | None:
    """The waiting spare that serves a request for `target` now, given `job` (removed from the spares); None
    when there is none, or it died while warming up: the request then gets a fresh process."""
    env = _worker_env()
    with _spares_lock:
        for spare in list(_spares):
            if _serves(spare, target, env):
                _spares.remove(spare)
                try:
                    spare.process.stdin.write(json.dumps(job) + "\n")
                    spare.process.stdin.close()
                    return spare
                except OSError:  # a broken pipe: it has exited
                    _close(spare.process)
    return None


def stop_spares() -> None:
    """Stop every spare worker nobody took (a stage that was cached, a run that failed before it)."""
    with _spares_lock:
        spares = list(_spares)
        _spares.clear()
    for spare in spares:
        stop_process(spare.process, grace_s=1)
        _close(spare.process)


def _close(process: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # closing flushes: a dead process's pipe is broken
        process.stdin.close()
    process.stdout.close()
    process.wait()


atexit.register(stop_spares)


@contextlib.contextmanager
def spare_workers() -> Iterator[None]:
    """A block (a flow run) whose unused spare workers stop when it ends, however it ends."""
    try:
        yield
    finally:
        stop_spares()


def emit_event(kind: str, **fields) -> None:
    """Report progress from inside a worker (rank 0 only): `run_worker` passes it to its `on_event`."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(EVENT_PREFIX + json.dumps({"event": kind, **fields}), flush=True)


def _worker_env() -> dict[str, str]:
    # The folder holding `tasks/` first on the path, so the worker imports the same code as the flow.
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def main(argv: list[str]) -> None:
    if argv[0] == "--wait":  # a spare: import now, then wait for the request (EOF: nobody needs it)
        target, warm_up = argv[1:]
        module = importlib.import_module(target.partition(":")[0])
        if hasattr(module, "warm_up"):
            module.warm_up(warm_up)
        line = sys.stdin.readline()
        if not line:
            return
        argv = [target, *json.loads(line)]
    target, request_path, result_path = argv
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    request_type = next(iter(inspect.signature(function, eval_str=True).parameters.values())).annotation
    result = function(request_type.model_validate_json(Path(request_path).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        # Written to a temporary name first: a result file that exists is always complete.
        partial = Path(result_path).with_suffix(".partial")
        partial.write_text(result.model_dump_json(indent=2))
        partial.replace(result_path)


def exit_without_teardown() -> None:
    """End the process now: the result is written, and the interpreter's teardown (collecting torch's and the
    model's objects, the libraries' exit hooks) takes longer than a small model's last steps, with the stage
    waiting for it (`benchmarks/worker_exit.py` measures both). Output is flushed first. Ranks under torchrun end
    the normal way, which also ends their process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_without_teardown()
