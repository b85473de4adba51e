"""Recomputation (`train.gradient_checkpointing`): each decoder layer runs under torch's non-reentrant checkpoint,
its input kept on the device (`true`) or in pinned host memory (`offload`), for both backends.

Why this and not the libraries' own:
- unsloth's checkpointing is reentrant (an autograd Function whose backward runs a backward of its own), which
  hides the LoRA weights from a CUDA graph's backward pass: nothing under it can be captured (tasks/train/graphs.py,
  GPU test). torch's non-reentrant checkpoint recomputes through saved-tensor hooks, which a graph captures.
- transformers' `offload=True` (`torch.autograd.graph.save_on_cpu`) allocates a new pinned tensor for every
  saved input and frees it after the backward pass; a graph replays its copies into the addresses it captured,
  so the host buffers here come from a pool that keeps them for the model's lifetime.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint


class HostBuffers:
    """Pinned host buffers, lent out per saved layer input and taken back when autograd drops what it saved.

    Sizes are rounded up to a power of two so that rows of changing width (packed examples) reuse a few
    buffers instead of allocating new ones every step. A buffer a CUDA graph captured may be lent again:
    the graph's copies and an eager step's run on the same stream, one micro-batch after another."""

    def __init__(self):
        self.free: dict[int, list[torch.Tensor]] = {}

    def lend(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(nbytes - 1, 0).bit_length()
        if self.free.get(size):
            return self.free[size].pop()
        # Pinned, so that the copies run asynchronously (and inside a graph); a CPU-only torch has no pinning.
        return torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def take_back(self, buffer: torch.Tensor) -> None:
        self.free.setdefault(buffer.numel(), []).append(buffer)


class _OnHost:
    """A layer input copied to a lent host buffer; the buffer goes back to the pool when this is dropped."""

    def __init__(self, tensor: torch.Tensor, buffers: HostBuffers):
        self.device = tensor.device
        nbytes = tensor.numel() * tensor.element_size()
        buffer = buffers.lend(nbytes)
        self.view = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        self.view.copy_(tensor, non_blocking=True)
        weakref.finalize(self, buffers.take_back, buffer)

    def to_device(self) -> torch.Tensor:
        return self.view.to(self.device, non_blocking=True)


class LayerCheckpoint:
    """A decoder layer's `_gradient_checkpointing_func` (transformers' `GradientCheckpointingLayer` calls it with
    the layer's call and its tensor arguments, the hidden states first)."""

    def __init__(self, host: HostBuffers | None):
        self.host = host  # None: the input stays on the device

    def __call__(self, function, hidden_states, *args, **kwargs):
        recompute = partial(checkpoint, function, hidden_states, *args, use_reentrant=False, **kwargs)
        if self.host is None or hidden_states.device.type == "cpu":
            return recompute()
        # Only the hidden states move: the other inputs (rotary tables, masks) are shared by every layer. The
        # hooks keep a reference to `pack`, so it holds the tensor's address, not the tensor.
        address, host = hidden_states.data_ptr(), self.host

        def pack(tensor):
            return _OnHost(tensor, host) if tensor.data_ptr() == address else tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return recompute()


def _unpack(saved):
    return saved.to_device() if isinstance(saved, _OnHost) else saved


def checkpoint_layers(model, checkpointing: bool | Literal["offload"]) -> int:
    """Give every decoder layer whose checkpointing the library turned on (transformers'
    `gradient_checkpointing_enable`, unsloth's `use_gradient_checkpointing=True`) a `LayerCheckpoint`;
    returns how many layers it has."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    host = HostBuffers() if checkpointing == "offload" else None
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise RuntimeError(
            f"{type(model).__name__} has no decoder layer with checkpointing turned on: "
            "train.gradient_checkpointing needs transformers' GradientCheckpointingLayer layers"
        )
    for layer in layers:
        layer._gradient_checkpointing_func = LayerCheckpoint(host)
    return len(layers)
