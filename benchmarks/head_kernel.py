"""A lever, measured and not made the default: one Triton kernel for each chunk of the LM head's cross-entropy
(`tasks/train/head_loss.py: chunk_losses_and_gradient`): each position's loss from its 16-bit logits, and the
logits overwritten by their gradient (softmax minus the one-hot target), in one launch per chunk.

The training loop's torch form makes an fp32 copy of a chunk's logits and passes over it four more times
(logsumexp, subtract, exp, cast back). This kernel reads each row twice (its log-sum-exp, then the gradient) in
fp32 registers and writes the gradient once, in place, as unsloth's and Liger's cross-entropy kernels do. On the
H200 it cut the head's GPU time and the step's peak memory but made whole training steps slower
(benchmarks/RESULTS.md, "Training speed"): `benchmarks/head_loss.py` times it alone, `gpu_train.py`'s
`*-head-kernel` rows in the worker.

Needs CUDA (Triton ships with torch's CUDA builds); with `TRITON_INTERPRET=1` it also runs on CPU tensors,
slowly, which is how it can be checked without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32768  # columns a program reads at a time: a 151,936-token row in 5 blocks
NUM_WARPS = 32


def cross_entropy_in_place(
    logits: torch.Tensor, targets: torch.Tensor, want_grad: bool, block: int = BLOCK, num_warps: int = NUM_WARPS
) -> torch.Tensor:
    """Each row's cross-entropy (fp32) against its target; with `want_grad`, `logits` (positions x vocabulary,
    rows contiguous) is overwritten by the gradient of the summed losses, in its own dtype. One program a row."""
    if logits.stride(1) != 1:
        raise ValueError("the head kernel needs logits whose rows are contiguous")
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    n_cols = logits.shape[1]
    _cross_entropy_rows[(logits.shape[0],)](
        logits,
        logits.stride(0),
        targets,
        losses,
        n_cols,
        WANT_GRAD=want_grad,
        BLOCK=min(block, triton.next_power_of_2(n_cols)),
        num_warps=num_warps,
    )
    return losses


def losses_and_gradient(logits: torch.Tensor, targets: torch.Tensor, want_gradient: bool):
    """`head_loss.chunk_losses_and_gradient` through the kernel: the gradient is the logits, overwritten."""
    return cross_entropy_in_place(logits, targets, want_gradient), logits if want_gradient else None


@triton.jit
def _cross_entropy_rows(
    logits_ptr, row_stride, targets_ptr, losses_ptr, n_cols, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    # Online log-sum-exp: a running maximum, and the sum of exponentials scaled to it.
    running_max = float("-inf")
    scaled_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        scaled_sum = scaled_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(scaled_sum)
    tl.store(losses_ptr + row, lse - tl.load(row_ptr + target).to(tl.float32))
    if WANT_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)
