"""The model to train, by backend: transformers + peft (`load_hf`) or unsloth on CUDA (`load_unsloth`), with the
LoRA adapters (or all weights, full fine-tuning), recomputation where asked, and an earlier attempt's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tunepipe.tasks.train.environment import dtype_of
from tunepipe.tasks.train.results import Backend
from tunepipe.tasks.train.task import TrainRequest


def load_model(
    request: TrainRequest, backend: Backend, precision: str, device, checkpointing: bool | Literal["offload"]
):
    """(model, tokenizer) ready to train on `device`."""
    load = load_unsloth if backend == "unsloth" else load_hf
    return load(request, precision, device, checkpointing)


def load_hf(request: TrainRequest, precision: str, device, checkpointing: bool | Literal["offload"]):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunepipe.tasks.runtime.base_model import load_tokenizer

    cfg, lora = request.cfg, request.lora
    four_bit = cfg.mode == "qlora" or request.model_cfg.load_in_4bit
    full = cfg.mode == "full"
    source = str(request.init_from) if full and request.init_from else request.base.name_or_path
    quantization = None
    if four_bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype_of(precision),
        )
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=None if source != request.base.name_or_path else request.base.revision,
        quantization_config=quantization,
        attn_implementation="sdpa",
        # Full fine-tuning keeps fp32 master weights (autocast computes in 16 bits); a frozen base needs no more.
        dtype=torch.float32 if full else dtype_of(precision),
        device_map={"": device} if four_bit else None,
    )
    if not four_bit:
        model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from tunepipe.tasks.train.recompute import checkpoint_layers

        checkpoint_layers(model, checkpointing)
    if not full:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                bias=lora.bias,
                use_rslora=lora.use_rslora,
                task_type="CAUSAL_LM",
            ),
        )
        load_adapter_weights(model, request.init_from)
    return model, load_tokenizer(request.base, request.model_cfg.chat_template)


def load_unsloth(request: TrainRequest, precision: str, device, checkpointing: bool | Literal["offload"]):
    from unsloth import FastLanguageModel  # CUDA only: never imported on the CPU path

    cfg, lora = request.cfg, request.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=request.base.name_or_path,
        revision=request.base.revision,
        max_seq_length=request.model_cfg.max_seq_length,
        dtype=dtype_of(precision),
        load_in_4bit=cfg.mode == "qlora" or request.model_cfg.load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        random_state=cfg.seed,
        use_gradient_checkpointing=bool(checkpointing),
    )
    if checkpointing:  # unsloth turned it on; the layers' recomputation is ours (tasks/train/recompute.py)
        from tunepipe.tasks.train.recompute import checkpoint_layers

        checkpoint_layers(model, checkpointing)
    load_adapter_weights(model, request.init_from)
    if request.model_cfg.chat_template:
        tokenizer.chat_template = request.model_cfg.chat_template
    return model, tokenizer


def load_adapter_weights(model, init_from: Path | None) -> None:
    if init_from is None:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(init_from / "adapter_model.safetensors"))
