"""The base model as every stage refers to it: its identity for cache keys, and its tokenizer.

The model stage resolves `model.base` to this reference; the data stages tokenize with it before any model
is loaded. It imports no stage.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class BaseModelRef(BaseModel):
    name_or_path: str
    revision: str | None
    fingerprint: str
    gguf: Path | None = None  # the GGUF the folder `name_or_path` was built from (a .gguf or ollama: base)


def load_tokenizer(base: BaseModelRef, chat_template: str | None = None):
    """The base model's tokenizer with `chat_template` (model.chat_template) when given; a padding token set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path, revision=base.revision)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{base.name_or_path} has no chat template: set model.chat_template in the config "
            "(a base model needs one chosen for it before fine-tuning)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
