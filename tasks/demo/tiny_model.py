"""A tiny, real Qwen3 model the project builds itself, for the demo and the tests (no hub download).

Architecture and tokenizer are real ones: Qwen3 from transformers, and GPT-2's vocabulary from the reference
vocabularies that ship inside llama.cpp, plus Qwen's ChatML tokens. llama.cpp's GGUF converter accepts only a
tokenizer whose pre-tokenizer it recognises (it hashes how the tokenizer splits a fixed text), and GPT-2's,
loaded from llama.cpp's own file, hashes to its "gpt-2" entry: the GGUFs tokenize chat text exactly as
transformers does. Only the size is tiny and the weights are random, seeded, so every build produces the
same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

# ChatML, as Qwen's instruct models use it, without Qwen's default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# 4 layers of width 128: it learns to read the category off unseen product pages and then to copy names and
# manufacturers within the steps a test affords, where 2 layers of width 64 stayed at chance on the category;
# a wider model took longer steps and more of them.
SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
)
EMBED_STD = 0.25
# The LM head (tied to the embeddings) is most of a CPU training step, so the vocabulary is a small one: GPT-2's.
# StarCoder's (digits one by one) learnt names later; deepseek-coder's, as transformers loads it, hashes to no
# known pre-tokenizer.
VOCAB = "gpt-2"  # llama.cpp's models/ggml-vocab-<VOCAB>.gguf
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # added where the vocabulary lacks them
# The folder name the shared cache keeps it under: another vocabulary or shape is another folder, never a
# stale model (the build marker also holds both).
CACHE_NAME = f"tiny-qwen3-{VOCAB}-{SHAPE['num_hidden_layers']}x{SHAPE['hidden_size']}"


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen3 (weights, config, tokenizer, chat template) to `out_dir`, once.

    A folder built by another version (another vocabulary, shape, seed or init) is built again."""
    marker = out_dir / ".complete"
    spec = json.dumps({"seed": seed, "embed_std": EMBED_STD, "vocab": VOCAB, **SHAPE}) + "\n"
    if marker.exists() and marker.read_text() == spec:
        return out_dir
    marker.unlink(missing_ok=True)
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from tunepipe.tasks.integrations.llama_cpp import llama_cpp_source

    tokenizer = chatml_tokenizer(llama_cpp_source() / "models" / f"ggml-vocab-{VOCAB}.gguf")

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **SHAPE,
    )
    model = Qwen3ForCausalLM(config)
    # The head is tied to the embeddings, and at this width the default init (std 0.02) caps every logit
    # near 1: no confident prediction is reachable and fine-tuning cannot move the loss. Std 0.25 can.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=EMBED_STD)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(spec)
    return out_dir


def chatml_tokenizer(vocab_gguf: Path):
    """A tokenizer from one of llama.cpp's reference vocabularies (`models/ggml-vocab-*.gguf`), with ChatML's
    tokens and template: the tiny model's, and (with Qwen2's vocabulary) the GPU benchmarks' Qwen-sized one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab_gguf.parent, gguf_file=vocab_gguf.name)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.bos_token = None  # ChatML starts with <|im_start|>, as in Qwen instruct models
    tokenizer.eos_token = "<|im_end|>"  # ends an assistant turn
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer
