"""`retrain:`: the bounded retrain loop and how each attempt differs from the one before."""

from __future__ import annotations

from pydantic import Field, model_validator

from tunepipe.tasks.runtime.config.section import Section


class RetrainChange(Section):
    """How one retry differs from the attempt before it. Unset fields keep that attempt's values."""

    continue_training: bool = Field(
        False,
        description="Start from the previous attempt's trained weights instead of the base model; "
        "max_steps (or epochs) then counts the new steps only.",
    )
    max_steps: int | None = Field(None, ge=1, description="Training steps of this attempt.")
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the training set instead of a step count (train.epochs with train.max_steps null).",
    )
    max_steps_factor: float | None = Field(
        None,
        gt=0,
        description="Train this share of the steps the previous attempt trained (at least one), e.g. "
        "0.5; instead of max_steps or epochs.",
    )
    learning_rate_factor: float | None = Field(None, gt=0, description="Multiply the learning rate, e.g. 0.5.")
    lora_r: int | None = Field(
        None,
        ge=1,
        description="LoRA rank of this attempt; alpha keeps its ratio to the rank. Not with "
        "continue_training (the trained adapter has the old rank).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RetrainChange:
        if self.model_dump(exclude_defaults=True) == {}:
            raise ValueError("this step changes nothing: the attempt would repeat the one before it")
        if sum(value is not None for value in (self.max_steps, self.epochs, self.max_steps_factor)) > 1:
            raise ValueError("give one of max_steps, epochs and max_steps_factor")
        if self.continue_training and self.lora_r is not None:
            raise ValueError("continue_training keeps the trained adapter's rank; lora_r cannot change with it")
        return self


class RetrainConfig(Section):
    """The bounded retrain loop: when the gate fails, train again following `plan`, at most max_attempts times."""

    max_attempts: int = Field(1, ge=1, description="Training attempts in all, the first included; 1: no retry.")
    plan: list[RetrainChange] = Field(
        default_factory=lambda: [RetrainChange(continue_training=True)],
        description="Changes for attempt 2, 3, ... in order; the last one repeats when the plan is shorter "
        "than max_attempts - 1.",
    )
    metric: str = Field(
        "eval_loss",
        description="The metric an attempt must improve; the loop stops early when it does not.",
    )
    min_improvement: float = Field(
        0.0,
        ge=0,
        description="An attempt improves when it beats the best earlier attempt on `metric` by more than this.",
    )
    past_best: RetrainChange | None = Field(
        default_factory=lambda: RetrainChange(continue_training=True, learning_rate_factor=0.5, max_steps_factor=0.5),
        description="Used instead of the plan's step when that step would only train longer (it changes neither "
        "the learning rate nor the rank) and the previous attempt's held-out curve (train.eval_steps) peaked "
        "before its last evaluation, so more of the same would go further past the best. The default continues "
        "from the returned weights (the best checkpoint with train.select best) at half the learning rate for "
        "half the steps. null: always follow the plan.",
    )
