"""What a stage returns, built for tests that start from a model folder instead of running the stage."""

from __future__ import annotations

from pathlib import Path

from tunepipe.tasks.train.results import TrainResult


def trained(folder: Path) -> TrainResult:
    """What the train stage returns for `folder`: a LoRA adapter, or a whole model (full fine-tuning)."""
    kind = "lora" if (folder / "adapter_config.json").is_file() else "full"
    return TrainResult(
        adapter_dir=folder,
        kind=kind,
        backend="hf",
        loss_history=[],
        runtime_s=0.0,
        trainable_params=0,
        total_params=0,
        steps=0,
        device="cpu x1",
        precision="fp32",
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        oom_retries=0,
        resumed_from_step=0,
    )
