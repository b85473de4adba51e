"""The LM head's cross-entropy at the loss positions, chunk by chunk, with its gradients computed on the way.

With a 151,936-token vocabulary the LM head dominates a small model's step, in time and in memory: the logits of
8,192 positions are 2.5 GB in bf16 and twice that in fp32. `head_cross_entropy` runs the head over a chunk of
positions at a time (`tunepipe.tasks.runtime.memory_plan.chunk_positions`); each chunk's logits give its losses and, at
once, their gradient (softmax minus the one-hot target), which is turned into the gradients of the hidden states
(and of the head's weight when it is trained) before the chunk's logits are freed. The backward pass then only
scales those gradients. So the head's matmul runs once per step instead of twice (a checkpointed head recomputes
it), and at most one chunk of logits exists at a time. unsloth's fused cross-entropy and Liger's fused linear
cross-entropy work the same way; this one serves both backends and every model.

The differentiable output is the sum of the losses: every token's gradient is scaled by the same number in
the backward pass, which is what lets the forward pass finish the weight's gradient. The per-token losses
come back detached, for reporting.

Imported by the training worker only (it imports torch at module level).
"""

from __future__ import annotations

import torch


def head_cross_entropy(hidden, head: torch.nn.Linear, targets, chunk: int):
    """(sum of the losses, each position's loss detached) for `hidden` (positions x width) under `head`."""
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"the LM head must be a plain Linear layer (got {type(head).__name__}): "
            "adapters on lm_head are not supported; leave it out of lora.target_modules"
        )
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():  # an evaluation: losses only (an autograd Function's inputs still ask for grads)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, chunk)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        device = hidden.device.type
        # The matmuls run in the autocast dtype when autocast is on (as the head would), else in the input's.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
            losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
            for start in range(0, len(targets), chunk):
                part = slice(start, start + chunk)
                h, t = hidden[part].to(dtype), targets[part]
                # What the head itself computes (nn.Linear: the bias added inside the matmul).
                logits = h @ w.T if bias is None else torch.addmm(bias.to(dtype), h, w.T)
                losses[part], grad = chunk_losses_and_gradient(logits, t, want_hidden or want_weight or want_bias)
                if grad is not None:
                    if want_bias:
                        grad_bias += grad.sum(0, dtype=torch.float32)
                    if want_hidden:
                        torch.matmul(grad, w, out=grad_hidden[part])  # straight into its rows
                    if want_weight:
                        grad_weight += grad.T @ h
                del logits, grad  # before the next chunk's logits: one chunk's at a time, not two
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        def scaled(grad, dtype):
            return None if grad is None else (grad * grad_total).to(dtype)

        return (
            scaled(grad_hidden, ctx.hidden_dtype),
            scaled(grad_weight, ctx.weight_dtype),
            scaled(grad_bias, ctx.weight_dtype),
            None,
            None,
        )


def chunk_losses_and_gradient(logits, targets, want_gradient: bool):
    """(each position's loss in fp32, the gradient of their sum or None): computed in place on one fp32 copy of
    the chunk's logits, and the gradient written over `logits`, in their dtype (no other chunk-sized tensor)."""
    full = logits.float()
    target_logits = full.gather(1, targets[:, None])
    peak = full.amax(-1, keepdim=True)
    sums = full.sub_(peak).exp_().sum(-1, keepdim=True)  # exp(logit - max), in place
    losses = (peak + sums.log() - target_logits)[:, 0]  # log-sum-exp minus the target's logit
    if not want_gradient:
        return losses, None
    full.div_(sums)  # softmax
    full[torch.arange(len(targets), device=targets.device), targets] -= 1
    return losses, logits.copy_(full)
