"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer on either backend.

`unsloth` (CUDA only, imported here and nowhere else) and `hf` (transformers + peft) load the model and
attach the adapter differently; the training loop, data and outputs are the same. The ML stack is imported
inside the functions so a fully cached re-run never pays for it.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel

from tasks.base_model import BaseModelRef, load_tokenizer
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import LoraConfig, ModelConfig, TrainConfig
from tasks.format_data import FormattedData

Backend = Literal["hf", "unsloth"]


class LossPoint(BaseModel):
    step: int
    loss: float
    learning_rate: float
    elapsed_s: float  # since training started: step times without model loading or compile warm-up


class TrainResult(BaseModel):
    adapter_dir: Path  # PEFT adapter + tokenizer, loadable with PeftModel.from_pretrained
    backend: Backend
    loss_history: list[LossPoint]
    runtime_s: float
    trainable_params: int
    total_params: int


def choose_backend(requested: str) -> Backend:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "unsloth" and not has_cuda:
        raise RuntimeError("train.backend=unsloth needs a CUDA GPU; use backend: hf (or auto) on this machine")
    if requested == "auto":
        return "unsloth" if has_cuda and importlib.util.find_spec("unsloth") else "hf"
    return requested


def train_adapter(
    data: FormattedData, base: BaseModelRef, model_cfg: ModelConfig, lora: LoraConfig, cfg: TrainConfig,
    out_dir: Path,
) -> TrainResult:
    backend = choose_backend(cfg.backend)
    load = _load_unsloth if backend == "unsloth" else _load_hf
    model, tokenizer = load(base, model_cfg, lora, cfg)

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # input_ids + labels are final (formatted with the chat template, loss on assistant tokens only).
    train_set = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train.rows()])
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=model_cfg.max_seq_length,
        bf16=_supports_bf16(),
        # unsloth sets up its own (offloaded) checkpointing when it attaches the adapter.
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf",
        save_strategy="no",
        report_to="none",  # the flow logs to MLflow itself, once per pipeline run
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps (and only works) with a GPU
    )
    clock = _log_clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                         callbacks=[clock])
    trainer.train()
    runtime = time.perf_counter() - clock.started

    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    history = [
        LossPoint(step=entry["step"], loss=entry["loss"], learning_rate=entry["learning_rate"],
                  elapsed_s=clock.elapsed[entry["step"]])
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainResult(
        adapter_dir=adapter_dir, backend=backend, loss_history=history, runtime_s=runtime,
        trainable_params=trainable, total_params=sum(p.numel() for p in model.parameters()),
    )


def _log_clock():
    """A trainer callback noting the seconds since training began at every logged step."""
    from transformers import TrainerCallback

    class LogClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.elapsed: dict[int, float] = {}

        def on_log(self, args, state, control, **kwargs):
            self.elapsed[state.global_step] = time.perf_counter() - self.started

    return LogClock()


def _supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _load_hf(base: BaseModelRef, model_cfg: ModelConfig, lora: LoraConfig, cfg: TrainConfig):
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(cfg.seed)  # the adapter's initial weights come from this
    quantization = None
    if model_cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        base.name_or_path, revision=base.revision, quantization_config=quantization,
        dtype=torch.bfloat16 if _supports_bf16() else torch.float32,
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(model)
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config), load_tokenizer(base, model_cfg.chat_template)


def _load_unsloth(base: BaseModelRef, model_cfg: ModelConfig, lora: LoraConfig, cfg: TrainConfig):
    from unsloth import FastLanguageModel  # CUDA only: never imported on the CPU path

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base.name_or_path, revision=base.revision, max_seq_length=model_cfg.max_seq_length,
        load_in_4bit=model_cfg.load_in_4bit, dtype=None,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False, random_state=cfg.seed,
    )
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    return model, tokenizer


@task(name="train", cache_policy=STAGE_CACHE, persist_result=True)
def train(
    data: FormattedData, base: BaseModelRef, model_cfg: ModelConfig, lora: LoraConfig, cfg: TrainConfig,
    workdir: Path,
) -> TrainResult:
    out_dir = stage_dir(workdir, "train", data, base, model_cfg, lora, cfg)
    return train_adapter(data, base, model_cfg, lora, cfg, out_dir)
