"""Data parallel through torch's DistributedDataParallel: the step's forward pass as one module call.

DDP reduces gradients with the hooks it sets on a wrapped module's parameters, bucketed and overlapped with the
backward pass, and it needs the forward pass to go through that module. The training step's forward is not the
model's own (`tunepipe.tasks.train.stepper.token_losses` runs the base transformer, then the chunked LM head at the loss
positions only), so `StepLosses` makes it the forward of a module that holds the model.

Imported by the training worker only, under torchrun (it imports torch at module level).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepLosses(torch.nn.Module):
    """`loss_fn(model, batch)` as this module's forward: what DistributedDataParallel wraps."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def data_parallel(model: torch.nn.Module, loss_fn: Callable, device: torch.device):
    """`StepLosses` under DistributedDataParallel (the process group is up): gradients are averaged across
    ranks during the backward pass, in buckets. Every trainable parameter gets a gradient in every step
    (no unused parameters to search for), and the buffers (rotary tables) are the same on every rank, so
    none are broadcast."""
    return torch.nn.parallel.DistributedDataParallel(
        StepLosses(model, loss_fn),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )
