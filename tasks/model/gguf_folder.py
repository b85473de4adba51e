"""Any GGUF turned into a transformers folder that trains, exports and serves with the source's own vocabulary.

The weights come through transformers' own GGUF reader (dequantized to float32); the tokenizer is then made
faithful to the GGUF (`tasks/model/gguf_tokenizer.py`), and the folder is only kept when transformers and llama.cpp
(on the source GGUF) give the same token ids for sample chat texts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunepipe.tasks.model.gguf_metadata import gguf_vocab, quantization_warning, read_gguf_metadata
from tunepipe.tasks.model.gguf_tokenizer import (
    SAMPLE_CONVERSATIONS,
    VocabularyMismatch,
    compare_token_ids,
    make_faithful,
)

SOURCE_RECORD = "source_gguf.json"

# Part of the cache key of built folders: a change to how they are built builds them again.
BUILD_VERSION = 5


def hf_folder_from_gguf(gguf: Path, out_dir: Path, chat_template: str | None = None) -> Path:
    """A transformers folder (float32 weights, faithful tokenizer, chat template) for `gguf`, built once.

    `chat_template` is used when the GGUF carries none (a base model). Raises VocabularyMismatch when the
    tokenizer written does not give llama.cpp's token ids on the sample chat texts.
    """
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    meta = read_gguf_metadata(gguf)
    from transformers import AutoTokenizer

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.chat_template is None:
        if chat_template is None:
            raise ValueError(
                f"{gguf} has no chat template (tokenizer.chat_template): set model.chat_template "
                "to the Jinja template to train and serve it with"
            )
        tokenizer.chat_template = chat_template
    special = gguf_special_tokens(tokenizer, meta)
    for name, token in special.items():  # transformers reads SmolLM2's eos as <|im_start|>; the GGUF says <|im_end|>
        setattr(tokenizer, name, token)
    tokenizer.save_pretrained(partial)
    make_faithful(partial, gguf, meta)
    # What is checked is the tokenizer as written, read back the way every stage reads it.
    tokenizer = AutoTokenizer.from_pretrained(partial)
    wrong = [
        f"{name} {getattr(tokenizer, name)!r} (the GGUF's is {token!r})"
        for name, token in special.items()
        if getattr(tokenizer, name) != token
    ]
    if wrong:
        raise VocabularyMismatch(f"the tokenizer written for {gguf} has other special tokens: {', '.join(wrong)}")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in SAMPLE_CONVERSATIONS]
    compare_token_ids(tokenizer, gguf, texts, f"the tokenizer written for {gguf}")

    model = dequantized_model(gguf)
    # Generation ends where a turn ends: the chat template's end-of-turn token (Gemma's <end_of_turn>, which a
    # base GGUF does not list) besides the eos token.
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, *turn_end_ids(tokenizer)})
    model.save_pretrained(partial)
    record = {"path": str(gguf), "vocab": gguf_vocab(meta).__dict__, "warning": quantization_warning(gguf, meta)}
    (partial / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    marker.write_text(str(gguf) + "\n")
    return out_dir


def dequantized_model(gguf: Path):
    """The GGUF's weights as a float32 transformers model, through transformers' own GGUF reader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model keeps a GGUF quantization marker that save_pretrained refuses; the same
    # architecture built from a config without it takes every weight as it is.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model


def gguf_special_tokens(tokenizer, meta: dict[str, str]) -> dict[str, str]:
    """The bos, eos, pad and unk tokens the GGUF names (by id), as tokenizer attributes."""
    keys = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "pad_token": "padding_token_id",
        "unk_token": "unknown_token_id",
    }
    return {
        name: tokenizer.convert_ids_to_tokens(int(meta[f"tokenizer.ggml.{key}"]))
        for name, key in keys.items()
        if f"tokenizer.ggml.{key}" in meta
    }


def turn_end_ids(tokenizer) -> list[int]:
    """The id of the chat template's end-of-turn marker when it is one token (ChatML's <|im_end|>, ...)."""
    from tunepipe.tasks.chat.template import transformers_renderer
    from tunepipe.tasks.integrations.ollama.template import end_of_turn

    if not tokenizer.chat_template:
        return []
    stop = end_of_turn(transformers_renderer(tokenizer.chat_template, eos_token=tokenizer.eos_token or ""))
    if not stop:
        return []
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []


def source_record(model_dir: Path) -> dict:
    """What `hf_folder_from_gguf` recorded of the source GGUF (path, vocab, warning); empty for other folders."""
    record = model_dir / SOURCE_RECORD
    return json.loads(record.read_text()) if record.exists() else {}
