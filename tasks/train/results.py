"""What the train stage hands on: the trained weights' folder and how training went.

Plain models that import no stage (and no MLflow: the training worker imports them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.data.results import FormattedSplit
from tunepipe.tasks.runtime.records import Point, Record

Backend = Literal["hf", "unsloth"]

# Per logged training step: MLflow metric name <- LossPoint field.
TRAINING_CURVE = {
    "train_loss": "loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
    "peak_gpu_memory_gib": "peak_gpu_memory_gib",
    "peak_gpu_reserved_gib": "peak_gpu_reserved_gib",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margin",
    "rewards/accuracies": "rewards_accuracy",
    "kl": "kl",
}


class LossPoint(BaseModel):
    step: int
    loss: float  # mean over the step's loss tokens
    learning_rate: float
    grad_norm: float | None = None  # before clipping
    tokens_per_s: float | None = None  # non-padding tokens, all devices, since the previous logged step
    peak_gpu_memory_gib: float | None = None  # None on the CPU
    peak_gpu_reserved_gib: float | None = None  # what the allocator held, CUDA graphs' memory pool included
    elapsed_s: float  # since training started: step times without model loading
    # Preference steps: `loss` is the KTO or DPO loss; the rewards are beta x (policy - reference)
    # log-probabilities of the answers, as TRL logs them.
    phase: Literal["sft", "kto", "dpo"] = "sft"
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    rewards_margin: float | None = None
    rewards_accuracy: float | None = None  # DPO: share of pairs whose chosen answer has the larger reward
    kl: float | None = None  # KTO: the batch's estimate of KL(policy || reference), clamped at 0


class EvalPoint(BaseModel):
    """One held-out evaluation during training (train.eval_steps)."""

    step: int  # 0: the weights an attempt continues from, before its first step
    eval_loss: float  # mean over the validation split's answer tokens, as the evaluate stage measures it
    # Answer metrics (tasks/chat/metrics.py) on the sampled prompts; empty for eval_loss.
    metrics: dict[str, float] = {}
    elapsed_s: float  # the evaluation's own wall time
    peak_gpu_memory_gib: float | None = None  # training's and its evaluations' peak so far; None on the CPU


class HeldOut(BaseModel):
    """What the evaluations during training measure, and what the best checkpoint is chosen by: the validation
    split, never the test split."""

    loss_rows: FormattedSplit  # the formatted validation split: the held-out loss
    examples: Path  # the clean validation examples: prompts to answer and the expected answers
    train_examples: Path  # the clean train examples: the keys a JSON answer must carry, as the evaluation reads them
    metric: str  # retrain.metric: `eval_loss`, or an answer metric measured on `train.eval_samples` prompts
    output_format: Literal["json", "text"]
    max_new_tokens: int
    batch_size: int


class TrainResult(BaseModel):
    adapter_dir: Path  # kind "lora": PEFT adapter + tokenizer; kind "full": the whole model + tokenizer
    kind: Literal["lora", "full"]
    backend: Backend
    loss_history: list[LossPoint]
    runtime_s: float
    trainable_params: int
    total_params: int
    steps: int
    device: str  # e.g. "cuda (NVIDIA H100 80GB HBM3) x1", "cpu x2"
    precision: str
    micro_batch_size: int  # after out-of-memory retries, if any
    gradient_accumulation_steps: int
    oom_retries: int
    resumed_from_step: int  # 0 for a run that started from scratch
    eval_history: list[EvalPoint] = []  # train.eval_steps
    best_step: int | None = None  # the best evaluation's step (whichever train.select returned)
    selected_step: int | None = None  # the step whose weights `adapter_dir` holds; None: the last (no selection)
    selection: str = ""  # why those weights, in words (the MLflow tag `train.selection`)
    stopped_early: bool = False  # train.early_stopping ended training before max_steps
    packed: bool = False  # micro-batches of mixed lengths were packed (train.packing, where the backend packs here)
    base_in_4bit: bool = False  # the frozen base was loaded in 4-bit (QLoRA): the evaluation loads it so too

    def curve(self) -> Record:
        """How training went: each attempt's run shows it. A stage that ran reported its curve live; a cached
        one did not, so the curve is also here, for the runs that lack it."""
        return Record(
            metrics={
                "train.runtime_s": self.runtime_s,
                "train.trainable_params": self.trainable_params,
                "train.oom_retries": self.oom_retries,
                "train.micro_batch_size": self.micro_batch_size,
                "train.gradient_accumulation_steps": self.gradient_accumulation_steps,
            },
            backfill=[p for point in self.loss_history for p in curve_points(point.model_dump())]
            + [p for point in self.eval_history for p in eval_points(point.model_dump())],
            tags={
                "train.backend": self.backend,
                "train.kind": self.kind,
                "train.device": self.device,
                "train.precision": self.precision,
                "train.selection": self.selection,
                "train.selected_step": "" if self.selected_step is None else str(self.selected_step),
                "train.stopped_early": str(self.stopped_early).lower(),
                "train.packed": str(self.packed).lower(),
            },
        )

    def record(self) -> Record:
        """The curve, and the trained weights with this result beside them, so the evaluate flow can score
        the run's model later (`trained_model`)."""
        from tunepipe.tasks.integrations.model_registry import MODEL_ARTIFACT

        if self.kind == "lora":
            files, folder = [(self.adapter_dir, "adapter")], "adapter"
        else:  # the weights of a whole model are logged by export (the `model` artifact); its config says which
            files, folder = [(self.adapter_dir / "config.json", MODEL_ARTIFACT)], MODEL_ARTIFACT
        return self.curve() + Record(files=files, texts={f"{folder}/train_result.json": self.model_dump_json(indent=2)})


def curve_points(values: dict) -> list[Point]:
    """A logged training step (a LossPoint, or the worker's `step` event) as MLflow metrics at its step."""
    curve = dict(TRAINING_CURVE)
    if values.get("phase", "sft") != "sft":  # a KTO or DPO loss is another quantity than SFT's token loss
        curve[f"train_{values['phase']}_loss"] = curve.pop("train_loss")
    return [
        Point(name=name, value=float(values[field]), step=values["step"])
        for name, field in curve.items()
        if values.get(field) is not None
    ]


def eval_points(values: dict) -> list[Point]:
    """A held-out evaluation during training: `eval_loss` and `eval_<metric>` at its step."""
    return [
        Point(name="eval_loss", value=float(values["eval_loss"]), step=values["step"]),
        *(
            Point(name=f"eval_{name}", value=float(value), step=values["step"])
            for name, value in values["metrics"].items()
        ),
    ]
