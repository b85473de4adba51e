"""The base transformer's forward and backward replayed from CUDA graphs, for rows of one repeating shape.

A LoRA step on a small model is bound by the host launching kernels, thousands a step (benchmarks/RESULTS.md,
issue 20), not by the GPU. Captured once as two CUDA graphs (the transformer's forward, and its backward to the
trainable weights) by `torch.cuda.make_graphed_callables`, a later micro-batch of the same shape launches two
graphs instead of those kernels. Only micro-batches whose layers see nothing but the token ids qualify:
unpadded, unpacked rows (a padding mask or packed positions change what attention does, and their lengths
change from step to step).
Everything else, and the LM head (its positions vary), runs as before.

Imported by the training worker only (it imports torch at module level).
"""

from __future__ import annotations

import itertools

import torch


class TransformerGraphs:
    """Runs the transformer (`causal_lm.base_model`) for `loss_hidden`: from graphs for the one shape captured,
    eagerly otherwise. A shape is captured when it comes twice in a row, so a run whose shapes vary never pays
    for a capture; a capture that fails (an op that waits for the host, a kernel capture does not take) is
    reported once and the run goes on eagerly."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.graphed = None  # the captured forward, for `shape`
        self.shape = None
        self.last_shape = None
        self.addresses: list[int] = []  # of every weight and buffer, at the capture
        self.failed = False

    def __call__(self, inputs: dict):
        ids = inputs["input_ids"]
        if self._graphable(inputs):
            if self.graphed is None and not self.failed and ids.shape == self.last_shape:
                self._capture(ids)
            self.last_shape = ids.shape
            if self.graphed is not None and ids.shape == self.shape and self._weights_in_place():
                self._allocate_gradients()
                return self.graphed(ids)
        return self.transformer(**inputs).last_hidden_state

    def _graphable(self, inputs: dict) -> bool:
        return (set(inputs) == {"input_ids", "use_cache"} and inputs["input_ids"].is_cuda
                and torch.is_grad_enabled() and self.transformer.training)

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
        self.graphed, self.failed = None, True
        print("train: CUDA graphs off, a weight of the transformer was replaced since the capture; eager steps",
              flush=True)
        return False

    def _addresses(self) -> list[int]:
        return [tensor.data_ptr() for tensor in itertools.chain(self.transformer.parameters(),
                                                                 self.transformer.buffers())]

    def _capture(self, ids) -> None:
        # The eager pass of this shape just before warmed up every kernel (autotuning, cuBLAS): no warm-up runs.
        # Its memory goes back to the device first, so that the graphs' private pool can take it, rather than
        # sit cached beside it.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        try:
            self.graphed = torch.cuda.make_graphed_callables(_Forward(self.transformer), (ids.clone(),),
                                                             num_warmup_iters=0)
        except Exception as error:  # noqa: BLE001  (whatever the capture refuses, eager steps still train)
            self.failed = True
            print(f"train: CUDA graphs off, the capture failed ({type(error).__name__}: {error}); eager steps",
                  flush=True)
            return
        self.shape = ids.shape
        self.addresses = self._addresses()
        print(f"train: the transformer's forward and backward captured as CUDA graphs for micro-batches of "
              f"{ids.shape[0]} x {ids.shape[1]} tokens", flush=True)


class _Forward(torch.nn.Module):
    """The transformer's call with its tensor argument alone, as make_graphed_callables takes it."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids):
        return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
