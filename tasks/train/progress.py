"""The curve a run reports as it trains: a `LossPoint` every `train.logging_steps`, kept in the state (so that a
checkpoint carries it) and sent to the stage as an event (its MLflow run's live metrics)."""

from __future__ import annotations

import time

from tunepipe.tasks.runtime.worker import emit_event
from tunepipe.tasks.train.environment import GIB
from tunepipe.tasks.train.results import LossPoint


def peak_gpu_gib(device, reserved: bool = False) -> float | None:
    """The most memory the run's tensors took on `device` (`reserved`: the allocator held) since the last reset;
    None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device)
    return round(peak / GIB, 3)


class LossLog:
    """Throughput since the previous logged step, and the points themselves, into `state.history`."""

    def __init__(self, state, device, started: float, peaks_from_here: bool = False):
        """`started`: the run's perf_counter start, less earlier runs' time (resume); `peaks_from_here`: the
        peak memory the points report counts from now (the model and the optimizer loaded)."""
        self.state, self.device, self.started = state, device, started
        if peaks_from_here and device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        self.tokens, self.since = 0, time.perf_counter()

    def count(self, rows: list[dict]) -> None:
        """The tokens of rows a step trained on (padding excluded)."""
        self.tokens += sum(len(row["input_ids"]) for row in rows)

    def record(self, step: int, loss, learning_rate: float, grad_norm, loss_tokens: int = 1, **extra) -> LossPoint:
        """A point of the curve at `step`: `loss` (a tensor, summed over `loss_tokens` tokens) is read from the
        device only here; `extra`: a preference step's phase and rewards."""
        now = time.perf_counter()
        point = LossPoint(
            step=step,
            loss=float(loss) / max(loss_tokens, 1),
            learning_rate=learning_rate,
            grad_norm=round(float(grad_norm), 6),
            tokens_per_s=round(self.tokens / (now - self.since), 1),
            peak_gpu_memory_gib=peak_gpu_gib(self.device),
            peak_gpu_reserved_gib=peak_gpu_gib(self.device, True),
            elapsed_s=round(now - self.started, 3),
            **extra,
        )
        self.state.history.append(point)
        emit_event("step", **point.model_dump())
        self.tokens, self.since = 0, now
        return point

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
