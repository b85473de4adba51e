"""Progress with an estimate of the time left, for the stages that answer prompts one batch at a time.

A line at most every `every_s` seconds and one at the end, e.g. `parity q8_0: 12/48 prompts in 34 s, about
1m42s left`. Inside a Prefect task it goes to the task's log (the CLI and the UI show it); elsewhere (the
evaluation worker, whose stdout the stage streams to its log) it is printed.
"""

from __future__ import annotations

import time


class Progress:
    def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.started = self._last = time.monotonic()
        self._emit = _emitter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            self._emit(self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        head = f"{self.what}: {self.done}/{self.total} {self.unit} in {elapsed:.0f} s"
        if self.done >= self.total or self.done == 0:
            return head
        left = elapsed / self.done * (self.total - self.done)  # the pace so far
        return f"{head}, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds} s"


def _emitter():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger().info
    except MissingContextError:
        return lambda line: print(line, flush=True)
