"""The bounded retrain loop's decisions: what the next attempt trains with, and when the loop is over.

The flow trains, evaluates and gates each attempt on the validation split; these plain functions read the
attempts so far (their validation reports and decisions) and the config's `retrain` plan. The loop ends when an
attempt passes the gate's rules on validation, when `retrain.max_attempts` attempts were made, or early, when a
failing attempt did not improve `retrain.metric` on the best attempt before it. A plan step that only trains
longer is replaced by `retrain.past_best` when the attempt before it was already past its best on the
validation curve (train.eval_steps): more steps would only go further past it. The test split decides after
the loop, once; nothing here reads it.
"""

from __future__ import annotations

import math

from tunepipe.tasks.chat.metrics import improvement
from tunepipe.tasks.evaluate.results import Attempt, AttemptPlan
from tunepipe.tasks.runtime.config import PipelineConfig, RetrainChange, RetrainConfig
from tunepipe.tasks.train.results import TrainResult


def next_attempt(cfg: PipelineConfig, attempts: list[Attempt]) -> AttemptPlan | None:
    """The plan of the next attempt, or None when the loop is over."""
    if not attempts:
        return AttemptPlan(number=1, lora=cfg.lora, train=cfg.train, init_from=None, change=None)
    last = attempts[-1]
    if last.decision.passed or len(attempts) >= cfg.retrain.max_attempts or _stalled(attempts, cfg.retrain):
        return None
    change = cfg.retrain.plan[min(len(attempts), len(cfg.retrain.plan)) - 1]
    trained = last.trained
    longer_only = change.learning_rate_factor is None and change.lora_r is None
    if cfg.retrain.past_best is not None and longer_only and past_its_best(trained):
        reason = (
            f"attempt {last.plan.number}'s validation {cfg.retrain.metric} peaked at step {trained.best_step} "
            f"of {trained.eval_history[-1].step}: training longer would go further past it"
        )
        return apply_change(last, cfg.retrain.past_best).model_copy(update={"reason": reason})
    return apply_change(last, change)


def past_its_best(trained: TrainResult) -> bool:
    """Whether the validation curve of a training (train.eval_steps) peaked before its last evaluation."""
    return trained.best_step is not None and trained.best_step < trained.eval_history[-1].step


def apply_change(previous: Attempt, change: RetrainChange) -> AttemptPlan:
    """The next attempt's plan; `continue_training` starts from the weights the previous attempt returned (its
    best checkpoint under train.select best)."""
    train, lora = previous.plan.train, previous.plan.lora
    length = {}
    if change.max_steps is not None:
        length = {"max_steps": change.max_steps}
    elif change.max_steps_factor is not None:
        length = {"max_steps": max(1, math.ceil(previous.trained.steps * change.max_steps_factor))}
    elif change.epochs is not None:
        length = {"max_steps": None, "epochs": change.epochs}
    learning_rate = train.learning_rate * (change.learning_rate_factor or 1.0)
    if change.lora_r is not None:
        lora = lora.model_copy(update={"r": change.lora_r, "alpha": max(1, round(lora.alpha * change.lora_r / lora.r))})
    return AttemptPlan(
        number=previous.plan.number + 1,
        lora=lora,
        train=train.model_copy(update={**length, "learning_rate": learning_rate}),
        init_from=previous.trained.adapter_dir if change.continue_training else None,
        change=change,
    )


def outcome(attempts: list[Attempt], cfg: RetrainConfig) -> str:
    """How the loop ended, in one sentence (its decisions are the gate's rules on the validation split)."""
    last, limit = attempts[-1], cfg.max_attempts
    if last.decision.passed:
        return f"attempt {last.plan.number} of at most {limit} passed the gate on validation"
    if stalled := _stalled(attempts, cfg):
        return f"stopped after attempt {last.plan.number} of {limit}: validation {stalled}"
    if limit == 1:
        return "the only attempt failed the gate on validation (retrain.max_attempts is 1)"
    return f"all {limit} attempts failed the gate on validation"


def _stalled(attempts: list[Attempt], cfg: RetrainConfig) -> str | None:
    """Why the last attempt counts as no improvement on the best before it (on validation), or None when it
    improved."""
    if len(attempts) < 2:
        return None
    metric = cfg.metric
    earlier = [(a.report.candidate.metrics.get(metric), a.plan.number) for a in attempts[:-1]]
    earlier = [(value, number) for value, number in earlier if value is not None]
    value = attempts[-1].report.candidate.metrics.get(metric)
    if value is None:
        return f"{metric} was not measured"
    if not earlier:
        return None
    best, best_number = max(earlier, key=lambda pair: improvement(metric, pair[0], 0.0))
    if improvement(metric, value, best) > cfg.min_improvement:
        return None
    return (
        f"{metric} {value:.4g} did not improve on attempt {best_number}'s {best:.4g} "
        f"by more than {cfg.min_improvement:g}"
    )
