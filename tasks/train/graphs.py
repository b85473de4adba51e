"""The base transformer's forward and backward replayed from CUDA graphs, for rows of one repeating shape.

A LoRA step on a small model is bound by the host launching kernels, thousands a step, not by the GPU
(benchmarks/RESULTS.md, training speed). Captured once as two CUDA graphs (the transformer's forward, and its
backward to the trainable weights) by `torch.cuda.make_graphed_callables`, a later micro-batch of the same shape
launches two graphs instead of those kernels. Two kinds of micro-batch qualify: unpadded, unpacked rows (their
layers see nothing but the token ids), and unsloth's packed rows laid out in the run's one `PackedLayout` (one
row of a fixed width and number of blocks; `tasks/train/batching.py`), whose example boundaries the graphs read
from buffers on the GPU (`tunepipe.tasks.patches.unsloth.PackedBoundaries`). Everything else (padded rows, hf's packed
rows, whose block mask is built on the host) and the LM head (its positions vary) runs as before.

Imported by the training worker only (it imports torch at module level).
"""

from __future__ import annotations

import itertools

import torch

from tunepipe.tasks.patches.unsloth import (
    PackedBoundaries,  # (unsloth itself is imported only when one is made)
)


def graphs_capture(mode: str = "lora", load_in_4bit: bool = False) -> bool:
    """Whether the transformer's step is captured: LoRA on a 16-bit base, with or without recomputation (what
    the GPU tests prove; QLoRA's 4-bit kernels and full fine-tuning are not proven yet)."""
    return mode == "lora" and not load_in_4bit


class TransformerGraphs:
    """Runs the transformer (`causal_lm.base_model`) for `loss_hidden`: from graphs for the one shape captured,
    eagerly otherwise. A shape is captured when it comes twice in a row, so a run whose shapes vary never pays
    for a capture; a capture that fails (an op that waits for the host, a kernel capture does not take) is
    reported once and the run goes on eagerly."""

    def __init__(self, transformer, layout=None):
        self.transformer = transformer
        self.layout = layout  # of unsloth's packed rows (tasks/train/batching.py: PackedLayout), or None
        device = next(transformer.parameters()).device
        self.boundaries = PackedBoundaries(layout, device) if layout is not None else None
        self.forward = _Forward(transformer, self.boundaries)
        self.graphed = None  # the captured forward, for `shape`
        self.shape = None
        self.last_shape = None
        self.addresses: list[int] = []  # of every weight and buffer, at the capture
        self.failed = False

    def __call__(self, inputs: dict):
        args = self._graph_args(inputs)
        if args is not None:
            shape = args[0].shape
            if self.graphed is None and shape == self.last_shape:
                self._capture(args)
            self.last_shape = shape
            if self.graphed is not None and shape == self.shape and self._weights_in_place():
                self._allocate_gradients()
                return self.graphed(*args)
        return self.transformer(**inputs).last_hidden_state

    def _graph_args(self, inputs: dict) -> tuple | None:
        """The tensors a graph takes for this micro-batch, or None when it does not qualify. A packed row of the
        layout has its boundaries loaded where a capture or a replay reads them."""
        if self.failed or not self._training_on_gpu(inputs["input_ids"]):
            return None
        if set(inputs) == {"input_ids", "use_cache"}:
            return (inputs["input_ids"],)
        packed = {"input_ids", "use_cache", "position_ids", "packed_seq_lengths"}
        if (
            self.layout is not None
            and set(inputs) == packed
            and inputs["input_ids"].shape == (1, self.layout.width)
            and len(inputs["packed_seq_lengths"]) == self.layout.segments
        ):
            self.boundaries.load(inputs["packed_seq_lengths"])
            return inputs["input_ids"], inputs["position_ids"]
        return None

    def _training_on_gpu(self, ids) -> bool:
        return ids.is_cuda and torch.is_grad_enabled() and self.transformer.training

    def _allocate_gradients(self) -> None:
        # Replayed gradients land in the graph's own buffers: accumulated into existing `.grad` tensors they are
        # added; into none, autograd would keep the buffer itself as `.grad`, which the next replay overwrites.
        for param in self.transformer.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)

    def _weights_in_place(self) -> bool:
        """Whether every weight (and buffer) is where the capture saw it: a graph reads the addresses it was
        captured with, so a weight replaced since (not copied into) would silently stop taking part. Otherwise the
        graphs are dropped."""
        if self._addresses() == self.addresses:
            return True
        self.graphed = None
        self._off("a weight of the transformer was replaced since the capture")
        return False

    def _off(self, reason: str) -> None:
        self.failed = True
        print(f"train: CUDA graphs off, {reason}; eager steps", flush=True)

    def _addresses(self) -> list[int]:
        return [
            tensor.data_ptr() for tensor in itertools.chain(self.transformer.parameters(), self.transformer.buffers())
        ]

    def _capture(self, args: tuple) -> None:
        # The eager pass of this shape just before warmed up every kernel (autotuning, cuBLAS). A packed row
        # runs once more with `PackedBoundaries.key`, so that unsloth computes and caches what it derives from
        # the boundaries (reading them back from the GPU, which a capture cannot) before the capture. The memory
        # goes back to the device first, so that the graphs' private pool can take it, rather than sit cached
        # beside it.
        packed = len(args) > 1
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        try:
            graphed = torch.cuda.make_graphed_callables(
                self.forward, tuple(arg.clone() for arg in args), num_warmup_iters=1 if packed else 0
            )
        except Exception as error:  # noqa: BLE001  (whatever the capture refuses, eager steps still train)
            self._off(f"the capture failed ({type(error).__name__}: {error})")
            return
        if packed and self.forward.varlen_calls != self.transformer.config.num_hidden_layers:
            # Any other route (one attention call per run of equal lengths, a block mask) would keep this row's
            # boundaries in the graph; only the varlen kernel reads them from the buffers.
            self._off(
                f"{self.forward.varlen_calls} of {self.transformer.config.num_hidden_layers} layers attended "
                f"to the packed row through the varlen kernel"
            )
            return
        self.graphed = graphed
        self.shape = args[0].shape
        self.addresses = self._addresses()
        kind = "packed rows" if packed else "micro-batches"
        print(
            f"train: the transformer's forward and backward captured as CUDA graphs for {kind} of "
            f"{self.shape[0]} x {self.shape[1]} tokens",
            flush=True,
        )


class _Forward(torch.nn.Module):
    """The transformer's call with tensor arguments alone, as make_graphed_callables takes it: the token ids and,
    for a packed row of the layout, its positions (its boundaries are those `boundaries.key` stands for; the
    calls of the varlen kernel the pass made are counted in `varlen_calls`)."""

    def __init__(self, transformer, boundaries):
        super().__init__()
        self.transformer = transformer
        self.boundaries = boundaries
        self.varlen_calls = 0

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        before = self.boundaries.varlen_calls()
        hidden = self.transformer(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, packed_seq_lengths=self.boundaries.key
        ).last_hidden_state
        self.varlen_calls = self.boundaries.varlen_calls() - before
        return hidden
