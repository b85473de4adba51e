"""Starting the training worker early. Without Prefect: `tunepipe run` starts it before its own imports of
Prefect and the flows, so that unsloth's import (the longest wait of a first run on a GPU) begins at once."""

from __future__ import annotations

from tunepipe.tasks.runtime.worker import prestart_worker

TRAIN_WORKER = "tunepipe.tasks.train.loop:train_model"


def prestart_training(backend: str, mode: str, devices: int) -> None:
    """Start the training worker now (train.backend, train.mode, train.devices), so that its imports overlap
    the stages before it; under torchrun (several devices) each rank starts when training does."""
    if devices == 1:
        prestart_worker(TRAIN_WORKER, f"{backend} {mode}")
