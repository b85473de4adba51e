"""Evaluation on the validation split during training, and the choices it drives: the best checkpoint, early
stopping, and which step's weights the stage returns (`train.select`). Every one of them reads the validation
split (`HeldOut`); the test split is the gate's alone.

Every `train.eval_steps` the held-out loss (and, for an answer metric, greedy answers to a few held-out prompts)
is measured (`HeldOutEvaluation`); `track_best` keeps the best evaluation and counts the evaluations without
improvement for early stopping; `Selection` keeps the best evaluation's trainable weights (in memory, and beside
the newest checkpoint on disk) and, with `train.select: best`, puts them back at the end.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from tunepipe.tasks.runtime.worker import emit_event
from tunepipe.tasks.train.checkpoints import TrainingState, load_trainable, trainable_weights
from tunepipe.tasks.train.progress import peak_gpu_gib
from tunepipe.tasks.train.results import EvalPoint, HeldOut
from tunepipe.tasks.train.stepper import Stepper


class HeldOutEvaluation:
    """The held-out checks during training (train.eval_steps), on the model as it trains.

    The loss runs over the whole eval split in batches of `eval.batch_size` rows, with the training step's own
    forward pass and LM head (`token_losses`) and no gradients: the same token-weighted mean the evaluate
    stage reports. An answer metric (`retrain.metric` other than eval_loss) is scored by
    `tunepipe.tasks.chat.metrics` on greedy answers (`tunepipe.tasks.chat.generation`, as the evaluate stage
    decodes) to the first `train.eval_samples` held-out prompts, which are also the first the evaluate stage
    answers. Every rank measures the same, so
    all of them take the same early-stopping decision without exchanging it.
    """

    def __init__(self, held_out: HeldOut, samples: int, tokenizer, stepper: Stepper):
        from tunepipe.tasks.chat.examples import read_examples
        from tunepipe.tasks.chat.metrics import required_keys

        self.held_out, self.tokenizer, self.stepper = held_out, tokenizer, stepper
        self.batch_size = held_out.batch_size  # halved on out-of-memory
        # Sorted by length, as the evaluate stage does: similar lengths share a batch.
        self.rows = sorted(held_out.loss_rows.rows(), key=lambda row: len(row["input_ids"]))
        examples = list(read_examples(held_out.examples))[:samples] if held_out.metric != "eval_loss" else []
        self.conversations = [[message.model_dump() for message in example.prompt] for example in examples]
        self.references = [example.answer for example in examples]
        self.required = (
            required_keys(example.answer for example in read_examples(held_out.train_examples))
            if examples and held_out.output_format == "json"
            else []
        )

    def __call__(self, model, step: int) -> EvalPoint:
        import torch

        started = time.perf_counter()
        model.eval()  # no dropout
        with torch.no_grad():
            loss, metrics = self._measured(model)
        model.train()
        point = EvalPoint(
            step=step,
            eval_loss=loss,
            metrics=metrics,
            elapsed_s=round(time.perf_counter() - started, 3),
            peak_gpu_memory_gib=peak_gpu_gib(self.stepper.device),
        )
        if selection_value(point, self.held_out.metric) is None:
            raise ValueError(
                f"retrain.metric {self.held_out.metric!r} was not measured on the {len(self.references)} "
                f"held-out prompts of train.eval_samples (measured: {', '.join(sorted(metrics))})"
            )
        return point

    def _measured(self, model) -> tuple[float, dict[str, float]]:
        """The loss and the answer metrics; on CUDA out-of-memory (the optimizer state is still on the device),
        again at half the batch, kept for the later evaluations."""
        import torch

        while True:
            try:
                return self._loss(model), self._metrics(model) if self.conversations else {}
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
            torch.cuda.empty_cache()  # after the except block: the failed batch's tensors are released by then
            self.batch_size //= 2
            print(
                f"train: CUDA out of memory in the held-out evaluation: batches of {self.batch_size} from now on",
                flush=True,
            )

    def _loss(self, model) -> float:
        stepper, batch_size = self.stepper, self.batch_size
        total, count = 0.0, 0
        for start in range(0, len(self.rows), batch_size):
            batch = stepper.batch(self.rows[start : start + batch_size])
            with stepper.autocast():
                loss_sum, _, _ = stepper.losses(model, batch)
            total += loss_sum.float()
            count += len(batch["loss_targets"])
        return float(total) / max(count, 1)

    def _metrics(self, model) -> dict[str, float]:
        from tunepipe.tasks.chat.generation import greedy_answers, switches_undone
        from tunepipe.tasks.chat.metrics import score_answers

        if self.stepper.backend == "unsloth":
            answers = unsloth_answers(
                model, self.tokenizer, self.conversations, self.held_out.max_new_tokens, self.batch_size
            )
        else:
            with switches_undone(model):  # the decoder's attention and norms must not stay on a model that trains
                answers = greedy_answers(
                    model, self.tokenizer, self.conversations, self.held_out.max_new_tokens, self.batch_size
                )
        means, _ = score_answers(
            [a.text for a in answers],
            self.references,
            [a.stopped for a in answers],
            self.held_out.output_format,
            self.required,
        )
        return means


def unsloth_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int):
    """Greedy answers from unsloth's model the way unsloth generates in the middle of training: its inference
    mode around `generate` (its attention is its own, so the evaluate stage's decoder does not apply).
    Not tested here: there is no CUDA GPU in CI."""
    import torch
    from unsloth import FastLanguageModel

    from tunepipe.tasks.chat.generation import render_prompt, stop_token_ids, to_answer

    stops = stop_token_ids(model, tokenizer)
    prompts = [render_prompt(tokenizer, conversation) for conversation in conversations]
    answers = []
    FastLanguageModel.for_inference(model)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers += [to_answer(tokenizer, tokens, stops) for tokens in out[:, width:].tolist()]
    finally:
        FastLanguageModel.for_training(model)
    return answers


def selection_value(point: EvalPoint, metric: str) -> float | None:
    return point.eval_loss if metric == "eval_loss" else point.metrics.get(metric)


def beats(point: EvalPoint, other: EvalPoint | None, metric: str) -> bool:
    """Whether `point` is a better checkpoint than `other` by `metric`; equal values go to the lower eval loss."""
    from tunepipe.tasks.chat.metrics import improvement

    if other is None:
        return True
    gain = improvement(metric, selection_value(point, metric), selection_value(other, metric))
    return gain > 0 or (gain == 0 and point.eval_loss < other.eval_loss)


def track_best(state: TrainingState, point: EvalPoint, metric: str, min_delta: float) -> bool:
    """Record an evaluation: the best so far and the count of evaluations without a gain of more than
    `min_delta` (early stopping's patience). Returns whether `point` is the new best."""
    from tunepipe.tasks.chat.metrics import improvement

    state.evals.append(point)
    value = selection_value(point, metric)
    if state.gain_reference is None or improvement(metric, value, state.gain_reference) > min_delta:
        state.gain_reference, state.evals_without_gain = value, 0
    else:
        state.evals_without_gain += 1
    if beats(point, state.best, metric):
        state.best = point
        return True
    return False


class Choice(NamedTuple):
    """The SFT result the stage returns: `step` (None without evaluations), how many SFT steps ran, and why."""

    step: int | None
    sft_steps: int
    reason: str


class Selection:
    """The run's evaluations on the validation split and what follows from them: the best weights so far
    (`best_weights`, a CPU copy), early stopping, and the chosen step. Without `train.eval_steps` there are none
    and the last step's weights are the result."""

    def __init__(self, evaluation: HeldOutEvaluation | None, cfg, state: TrainingState, best_weights: dict | None):
        self.evaluation, self.cfg, self.state, self.best_weights = evaluation, cfg, state, best_weights

    def due(self, step: int, total_steps: int) -> bool:
        return self.evaluation is not None and (step % self.cfg.eval_steps == 0 or step == total_steps)

    def evaluate(self, model, step: int) -> None:
        """Evaluate at `step`, report it, and keep the weights when this step is the best so far."""
        state = self.state
        point = self.evaluation(model, step)
        min_delta = self.cfg.early_stopping.min_delta if self.cfg.early_stopping else 0.0
        if track_best(state, point, self.evaluation.held_out.metric, min_delta):
            self.best_weights = trainable_weights(model)
        shown = ", ".join(f"{name} {value:.4g}" for name, value in point.metrics.items() if "." not in name)
        print(
            f"train: step {step}: held-out loss {point.eval_loss:.4f}{', ' + shown if shown else ''} "
            f"({point.elapsed_s:.1f} s); best so far: step {state.best.step}",
            flush=True,
        )
        emit_event("eval", **point.model_dump())

    def stops_early(self, step: int, total_steps: int) -> bool:
        """Whether the evaluations without a gain have run out early stopping's patience before the last step."""
        early_stopping = self.cfg.early_stopping
        if early_stopping is None or self.state.evals_without_gain < early_stopping.patience or step >= total_steps:
            return False
        print(
            f"train: early stopping at step {step}: {self.evaluation.held_out.metric} did not improve for "
            f"{self.state.evals_without_gain} evaluations",
            flush=True,
        )
        return True

    def choose(self, model, last_step: int, resumed_from: int, total_steps: int) -> Choice:
        """The SFT result: with `train.select: best` the best evaluation's weights are put back into `model`."""
        state, select = self.state, self.cfg.selection
        in_preference = resumed_from > total_steps  # resumed inside the preference phase: SFT's result is chosen
        sft_steps = (state.evals[-1].step if state.evals else total_steps) if in_preference else last_step
        evaluated = self.evaluation is not None and state.best is not None  # (`kto` / `dpo` alone have no SFT steps)
        selected = state.best.step if evaluated and select == "best" else sft_steps
        if selected != sft_steps and not in_preference:  # a preference phase starts from the chosen weights
            load_trainable(model, self.best_weights)
        reason = selection_reason(
            state, select, selected, sft_steps, total_steps, self.evaluation.held_out.metric if evaluated else None
        )
        return Choice(selected if evaluated else None, sft_steps, reason)


def selection_reason(
    state: TrainingState, select: str, selected: int, last_step: int, total_steps: int, metric: str | None
) -> str:
    """Which step's weights the stage returns and why, in one sentence (the `train.selection` tag)."""
    ended = f"step {last_step} of {total_steps}" + (" (early stopping)" if last_step < total_steps else "")
    if metric is None:
        return f"the last step's weights ({ended}); no held-out evaluations (train.eval_steps unset)"
    best = state.best
    value = selection_value(best, metric)
    described = f"{metric} {value:.4g}" + (f", eval loss {best.eval_loss:.4g}" if metric != "eval_loss" else "")
    steps = f"{len(state.evals)} evaluations, steps {state.evals[0].step}-{state.evals[-1].step}"
    if select == "last":
        return (
            f"train.select=last: the weights of {ended}; the best evaluation was step {best.step} "
            f"({described}) of {steps}"
        )
    last = state.evals[-1]
    if selected == last.step:
        return f"train.select=best: step {selected} ({described}), the last of {steps}, was the best; {ended}"
    return (
        f"train.select=best: step {selected} ({described}) was the best of {steps}; the last, step "
        f"{last.step}, had {metric} {selection_value(last, metric):.4g}; trained to {ended}"
    )
