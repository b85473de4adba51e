"""One optimizer step: the forward and backward of its micro-batches (`Stepper`), then clipping, the optimizer
and the schedule (`finish_step`).

The loss is the cross-entropy of the loss-carrying tokens alone: the base transformer runs once over a micro-batch
(from CUDA graphs where its shape repeats, `tasks/train/graphs.py`), and the LM head runs at those positions only,
in chunks whose gradients are computed on the way (`tasks/train/head_loss.py`), never materialising the full
logits. On several ranks, torch's DistributedDataParallel averages the gradients during the backward pass
(`tasks/train/data_parallel.py`), skipping the exchange on all but a step's last micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunepipe.tasks.runtime.memory_plan import chunk_positions
from tunepipe.tasks.runtime.worker import emit_event
from tunepipe.tasks.train.batching import PackedLayout, make_batch, row_tokens
from tunepipe.tasks.train.environment import EnvironmentReport, Rank, dtype_of
from tunepipe.tasks.train.results import Backend

if TYPE_CHECKING:
    from tunepipe.tasks.train.checkpoints import TrainingState
    from tunepipe.tasks.train.task import TrainRequest


def make_optimizer(model, cfg):
    import torch

    # As transformers' Trainer does: no weight decay on biases and norm weights (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=torch.cuda.is_available())


def make_scheduler(cfg, optimizer, warmup_steps: int, steps: int):
    from transformers import get_scheduler

    # transformers' "constant" would skip the warm-up; ours warms up like the others.
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)


def token_losses(model, batch: dict, backend: Backend, head_chunk: int, transformer=None):
    """Cross-entropy of every loss-carrying token, with the LM head applied at those positions only, in chunks
    that never keep more than one chunk's logits (`tasks/train/head_loss.py`).

    Returns (sum of the losses, differentiable; each token's loss, detached; example index of each loss);
    the base transformer runs once over the whole batch (through `transformer` when given: CUDA graphs).
    """
    from tunepipe.tasks.train.head_loss import head_cross_entropy

    hidden, head = loss_hidden(model, batch, backend, transformer)
    total, losses = head_cross_entropy(hidden, head, batch["loss_targets"], head_chunk)
    return total, losses, batch["loss_example"]


def causal_lm_of(model):
    """The causal LM inside a peft model (its LoRA layers in place), or the model itself (full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_hidden(model, batch: dict, backend: Backend, transformer=None):
    """(hidden states at the loss-carrying positions, the LM head): the base transformer run once over the batch,
    by `transformer(inputs)` when given (`tasks/train/graphs.py`)."""
    causal_lm = causal_lm_of(model)
    # No KV cache: transformers detects packed rows (and masks across examples) only without one.
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:  # packed: positions restart at every example
        inputs["position_ids"] = batch["position_ids"]
        if backend == "unsloth":
            inputs["packed_seq_lengths"] = batch["packed_seq_lengths"]
    hidden = transformer(inputs) if transformer else causal_lm.base_model(**inputs).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch["loss_at"]), causal_lm.get_output_embeddings()


@dataclass
class Stepper:
    """Forward and backward of a step's examples, in micro-batches, with the out-of-memory fallback; on several
    ranks through DistributedDataParallel."""

    model: object
    scaler: object
    device: object
    precision: str
    backend: Backend
    packing: bool
    row_tokens: int | None  # longest packed row (None: a micro-batch is one row)
    head_chunk: int  # positions per LM-head chunk (tasks/train/head_loss.py)
    pad_id: int
    max_oom_retries: int
    rank: Rank
    cuda_graphs: bool = False  # replay the transformer from CUDA graphs where a shape repeats (one device)
    packed_layout: PackedLayout | None = None  # unsloth's packed micro-batches in one shape, for the graphs

    @classmethod
    def for_run(
        cls,
        request: TrainRequest,
        env: EnvironmentReport,
        backend: Backend,
        rank: Rank,
        model,
        tokenizer,
        scaler,
        packing: bool,
        cuda_graphs: bool,
        layout: PackedLayout | None,
    ) -> Stepper:
        """The run's stepper: its precision, packed rows, LM-head chunks and retries follow from the config and the
        checked environment (`env`)."""
        return cls(
            model=model,
            scaler=scaler,
            device=rank.device(),
            precision=env.precision,
            backend=backend,
            packing=packing,
            row_tokens=row_tokens(backend, request.model_cfg.max_seq_length),
            head_chunk=chunk_positions(model.config.vocab_size, bool(env.gradient_checkpointing)),
            pad_id=tokenizer.pad_token_id,
            max_oom_retries=request.cfg.max_oom_retries,
            rank=rank,
            cuda_graphs=cuda_graphs,
            packed_layout=layout,
        )

    def __post_init__(self):
        from functools import partial

        self.graphs = None
        if self.cuda_graphs and self.rank.world == 1:
            from tunepipe.tasks.train.graphs import TransformerGraphs

            self.graphs = TransformerGraphs(causal_lm_of(self.model).base_model, self.packed_layout)
        self.losses = partial(token_losses, backend=self.backend, head_chunk=self.head_chunk, transformer=self.graphs)
        self.parallel = None
        if self.rank.world > 1:
            from tunepipe.tasks.train.data_parallel import data_parallel

            self.parallel = data_parallel(self.model, self.losses, self.device)

    @property
    def gradients_in_graphs(self) -> bool:
        """Whether a captured graph writes the gradients: then they stay allocated between steps (zeroed, not
        set to None; tasks/train/graphs.py)."""
        return self.graphs is not None and self.graphs.graphed is not None

    def autocast(self, **kwargs):
        """Mixed precision at the run's precision (none in fp32)."""
        import torch

        return torch.autocast(
            self.device.type, dtype=dtype_of(self.precision), enabled=self.precision != "fp32", **kwargs
        )

    def batch(self, rows: list[dict], layout: PackedLayout | None = None) -> dict:
        """The micro-batch of `rows` as this run batches them."""
        return make_batch(rows, self.packing, self.pad_id, self.device, self.row_tokens, layout)

    def run(self, rows: list[dict], loss_tokens: int, state: TrainingState, step: int):
        """Accumulate the gradients of `rows`; returns their summed token loss (a detached tensor). On CUDA
        out-of-memory, halve the micro-batch (the same examples, so the same effective batch) and redo the step."""
        import torch

        if not self.packing:  # similar lengths share a micro-batch: less padding, the same step
            rows = sorted(rows, key=lambda row: len(row["input_ids"]))
        while True:
            try:
                starts = range(0, len(rows), state.micro_batch_size)
                return sum(
                    self._micro(rows[start : start + state.micro_batch_size], loss_tokens, last=start == starts[-1])
                    for start in starts
                )
            except torch.cuda.OutOfMemoryError:
                self.model.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                # Ranks cannot agree on a retry without more communication: several devices fail instead.
                if self.rank.world > 1 or state.micro_batch_size == 1 or state.oom_retries >= self.max_oom_retries:
                    raise
                before = state.micro_batch_size
                state.micro_batch_size = before // 2
                state.oom_retries += 1
                self.packed_layout = None  # its rows are as wide as the larger micro-batches': no memory saved
                message = (
                    f"CUDA out of memory at step {step} with micro-batch {before}: retrying with "
                    f"micro-batch {state.micro_batch_size} and twice the accumulation (same effective "
                    f"batch; retry {state.oom_retries} of at most {self.max_oom_retries})"
                )
                print(f"train: {message}", flush=True)
                emit_event(
                    "oom_retry",
                    step=step,
                    retries=state.oom_retries,
                    micro_batch_size=state.micro_batch_size,
                    message=message,
                )

    def _micro(self, rows: list[dict], loss_tokens: int, last: bool = True):
        import contextlib

        # The layout's padding buys nothing once the graphs are off.
        layout = self.packed_layout if self.graphs is not None and not self.graphs.failed else None
        batch = self.batch(rows, layout)
        # Gradients are exchanged once a step: with the last micro-batch's backward pass.
        sync = contextlib.nullcontext() if self.parallel is None or last else self.parallel.no_sync()
        with sync:
            # No autocast cache: CUDA graphs cannot capture it, and bf16 / fp16 weights are not cast anyway.
            with self.autocast(cache_enabled=False):
                loss_sum, _, _ = self.parallel(batch) if self.parallel else self.losses(self.model, batch)
            # Scaled to the whole step's mean token loss over all micro-batches and ranks; DDP averages the
            # ranks' gradients, so each rank's share is scaled up by their number to make that a sum.
            self.scaler.scale(loss_sum * self.rank.world / loss_tokens).backward()
        return loss_sum.detach()


def finish_step(trainable, optimizer, scheduler, scaler, max_grad_norm, set_to_none: bool = True):
    """Clip, step the optimizer and the schedule (the gradients are already the same on every rank); returns
    the gradient norm (a tensor)."""
    import torch

    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return norm


def summed_over_ranks(loss_sum, rank: Rank):
    """The step's summed token loss over all ranks (a tensor on the device)."""
    import torch

    if rank.world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum
