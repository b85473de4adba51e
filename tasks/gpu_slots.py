"""GPU admission: stages that put a model on the GPU hold slots of the Prefect global concurrency limit `gpu`.

Create the limit once per Prefect server with one slot per GPU (`prefect gcl create gpu --limit 2` on a
two-GPU worker); a run that would exceed it waits until a slot frees, so two runs never train on one GPU at
once, whichever deployment, schedule or person started them. Where no such limit exists (the CLI's
temporary API, a laptop), Prefect lets the stage through without waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "gpu"


@contextmanager
def gpu_slots(devices: int = 1) -> Iterator[None]:
    """Hold `devices` slots of the `gpu` limit for the duration of the block (waiting for them first)."""
    from prefect.concurrency.sync import concurrency
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    with concurrency(GPU_LIMIT, occupy=devices):
        logger.info("holding %d slot(s) of concurrency limit %r", devices, GPU_LIMIT)
        try:
            yield
        finally:
            logger.info("releasing %d slot(s) of concurrency limit %r", devices, GPU_LIMIT)
