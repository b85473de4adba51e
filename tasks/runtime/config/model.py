"""`model:` and `lora:`: the base model and the adapter trained on it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepipe.tasks.runtime.config.section import Section


class ModelConfig(Section):
    base: str = Field(
        description="The base model: a Hugging Face hub id, a local transformers folder, a `.gguf` file, or "
        "`ollama:NAME[:TAG]` (the GGUF that Ollama at `ollama.host` serves, found through its API or its models "
        "folder). A GGUF is dequantized into a transformers folder once, with a tokenizer checked against llama.cpp."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    max_seq_length: int = Field(
        1024, ge=16, description="Longest formatted example, in tokens; longer ones are quarantined, not truncated."
    )
    load_in_4bit: bool = Field(
        False, description="Load the frozen base in 4-bit (QLoRA, CUDA only); `train.mode: qlora` implies it."
    )
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory the run may use, in GiB (16 for a T4, 24 for an RTX 4090): the run "
        "plan (`tunepipe check`, and the run before its first stage) sizes every stage against it, and the "
        "training and evaluation workers cap their CUDA allocator there. null: the card's free memory.",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="Rank of the LoRA update matrices.")
    alpha: int = Field(
        32, ge=1, description="LoRA scaling: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 lets unsloth use its fast path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters, or `all-linear` for every linear layer but the LM head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained with the adapter.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), for large ranks.")
