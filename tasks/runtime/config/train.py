"""`train:`: how the model is trained, its preference phase and its early stop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunepipe.tasks.runtime.config.section import Section


class PreferenceConfig(Section):
    """KTO and DPO: the losses as TRL defines them, against reference log-probabilities computed
    once, by the model as it stands when the preference phase starts (the base with adapters off, or the SFT
    result for `sft+kto` / `sft+dpo`)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (TRL's beta).")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable examples' losses.")
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="KTO: weight of the undesirable examples' losses; TRL advises weights such that "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) lies in [1, 4/3].",
    )
    max_steps: int = Field(
        50,
        ge=1,
        description="Optimizer steps of the preference phase (after SFT's `train.max_steps` when the "
        "objective is `sft+kto` or `sft+dpo`; instead of them for `kto` or `dpo`).",
    )
    learning_rate: float = Field(
        5e-5,
        gt=0,
        description="Learning rate of the preference phase (lower than SFT's: it fine-tunes a "
        "model that already answers well).",
    )
    batch_size: int = Field(
        8,
        ge=2,
        description="Examples (KTO) or pairs (DPO) per step; KTO's KL estimate needs at least two.",
    )


class EarlyStopping(Section):
    patience: int = Field(
        ge=1, description="Stop after this many evaluations in a row without an improvement of `retrain.metric`."
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="An evaluation improves only when it beats the best so far by more than this "
        "(the best checkpoint still follows every gain).",
    )


class TrainConfig(Section):
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="`auto` uses unsloth when CUDA is available, else transformers + peft."
    )
    objective: Literal["sft", "kto", "dpo", "sft+kto", "sft+dpo"] = Field(
        "sft",
        description="`sft`: learn the good answers (SFT rows, desirable KTO rows, DPO chosen answers). "
        "`kto`: rated answers, desirable up and undesirable down (unpaired thumbs). `dpo`: chosen over rejected "
        "answers to the same prompt. `sft+kto` / `sft+dpo`: SFT first, then the preference phase, in one run.",
    )
    preference: PreferenceConfig = PreferenceConfig()
    mode: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="`lora`: adapter on a 16-bit base; `qlora`: adapter on a 4-bit base (CUDA only); "
        "`full`: train every weight (the output is a whole model, not an adapter).",
    )
    max_steps: int | None = Field(
        100, ge=1, description="Optimizer steps to train; null trains `epochs` passes instead."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training set, used when `max_steps` is null.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="`adamw_8bit` keeps the optimizer state in 8 bits (bitsandbytes, CUDA only)."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After `warmup_steps` of linear warm-up: decay linearly or by cosine to zero, or stay."
    )
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null does not clip.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU."
    )
    packing: bool = Field(
        True,
        description="Padding-free batches: a micro-batch's examples are concatenated into one row, each "
        "attending only to itself; no compute is spent on padding.",
    )
    assistant_only_loss: bool = Field(
        True, description="Train on the assistant's answers only; false also trains on system and user turns."
    )
    gradient_checkpointing: bool | Literal["auto", "offload"] = Field(
        "auto",
        description="Recompute activations in the backward pass: much less memory, slower steps. `auto`: "
        "only when a step's activations would not fit in half the free memory (the environment check's estimate). "
        "`offload` also keeps each layer's saved input in pinned CPU memory (on a GPU; on the CPU it is `true`).",
    )
    cuda_graphs: bool = Field(
        True,
        description="LoRA on a 16-bit base, one CUDA device, with or without recomputation: replay the "
        "transformer's forward and backward from CUDA graphs for unpadded, unpacked "
        "micro-batches of one repeating shape (a shape is captured when it comes twice in a row), and for "
        "unsloth's packed micro-batches, laid out in one shape for the run (padding included), so a step "
        "launches two graphs instead of thousands of kernels. Other micro-batches run as before; a capture that "
        "fails is reported and training goes on without graphs.",
    )
    save_steps: int = Field(
        50, ge=1, description="Write a checkpoint every this many steps; a killed run resumes from the newest."
    )
    max_oom_retries: int = Field(
        3, ge=0, description="On CUDA out-of-memory, halve the micro-batch and double accumulation, at most this often."
    )
    devices: int = Field(1, ge=1, description="Data-parallel processes (GPUs) to train on, through torchrun.")
    seed: int = 42
    logging_steps: int = Field(
        1, ge=1, description="Log loss, learning rate, grad norm, tokens/s and peak memory every this many steps."
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Every this many steps (and at the last), measure the loss on the validation "
        "split and, when `retrain.metric` is a metric of the answers, that metric on `eval_samples` validation "
        "prompts answered greedily; both reach MLflow as curves (`eval_loss`, `eval_<metric>`). null: none.",
    )
    eval_samples: int = Field(
        16,
        ge=1,
        description="Validation prompts (the first ones of the split) answered at each evaluation "
        "during training (train.eval_steps).",
    )
    select: Literal["last", "best"] | None = Field(
        None,
        description="Which weights the train stage returns, and so what is evaluated, exported and served: "
        "`last` (the last step) or `best` (the evaluation with the best `retrain.metric`; ties: the lower eval "
        "loss). null: `best` when `eval_steps` is set, else `last`.",
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop before `max_steps` once `retrain.metric` has stopped improving (needs `eval_steps`)."
    )

    @property
    def selection(self) -> Literal["last", "best"]:
        return self.select or ("best" if self.eval_steps else "last")

    @model_validator(mode="after")
    def _evaluations_needed(self) -> TrainConfig:
        if self.eval_steps is None and (self.select == "best" or self.early_stopping is not None):
            what = "train.select=best" if self.select == "best" else "train.early_stopping"
            raise ValueError(f"{what} needs held-out evaluations during training: set train.eval_steps")
        return self
