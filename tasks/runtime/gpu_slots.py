"""GPU admission: stages that put a model on the GPU hold slots of the Prefect global concurrency limit `gpu`.

Create the limit once per Prefect server with one slot per GPU (`prefect gcl create gpu --limit 2` on a
two-GPU worker); a run that would exceed it waits until a slot frees, so two runs never use one GPU at
once, whichever deployment, schedule or person started them. Where no such limit exists (the CLI's
temporary API, a laptop), the stage goes through without waiting; a plain call outside any Prefect run (a
notebook, a unit test) has nothing to be admitted by and runs at once.

The stages that put a model on a GPU: training (its worker) and evaluation (the generation worker, which
loads base, champion and candidate in bf16 on CUDA). Export merges on the CPU and parity runs llama.cpp with
no layers offloaded, so neither holds a slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "gpu"


@contextmanager
def gpu_slots(devices: int = 1) -> Iterator[None]:
    """Hold `devices` slots of the `gpu` limit for the duration of the block (waiting for them first)."""
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        yield
        return
    logger = get_run_logger()
    if not limit_exists(GPU_LIMIT):
        logger.info("no concurrency limit %r on this Prefect API: the stage does not wait for a GPU slot", GPU_LIMIT)
        yield
        return
    with concurrency(GPU_LIMIT, occupy=devices):
        logger.info("holding %d slot(s) of concurrency limit %r", devices, GPU_LIMIT)
        try:
            yield
        finally:
            logger.info("releasing %d slot(s) of concurrency limit %r", devices, GPU_LIMIT)


def limit_exists(name: str) -> bool:
    """Asked with a read before acquiring: without the limit Prefect lets the stage through anyway, but only
    after its acquisition request, a write that the temporary server's SQLite refuses as busy while another
    write holds it (right after a stage: its logs and states); Prefect's client then backs off and retries."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True
