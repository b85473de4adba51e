"""The tiny Qwen3 the demo and the tests use: reproducible bytes, loadable, the expected shape and tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.tasks.demo.tiny_model import EMBED_STD, SHAPE, build_tiny_model


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (build_tiny_model(tmp_path_factory.mktemp("tiny-a")), build_tiny_model(tmp_path_factory.mktemp("tiny-b")))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"])
def test_two_builds_are_byte_identical(two_builds: tuple[Path, Path], name: str) -> None:
    first, second = (folder / name for folder in two_builds)
    assert first.stat().st_size > 0
    assert first.read_bytes() == second.read_bytes()


def test_a_finished_build_is_not_redone(two_builds: tuple[Path, Path]) -> None:
    folder = two_builds[0]
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(folder) == folder
    assert weights.stat().st_mtime_ns == before


def test_a_build_of_another_shape_is_redone(two_builds: tuple[Path, Path]) -> None:
    folder = two_builds[1]
    marker = folder / ".complete"
    marker.write_text(marker.read_text().replace('"num_hidden_layers": ', '"num_hidden_layers": 1'))
    before = (folder / "model.safetensors").read_bytes()
    build_tiny_model(folder)
    assert json.loads(marker.read_text())["num_hidden_layers"] == SHAPE["num_hidden_layers"]
    assert (folder / "model.safetensors").read_bytes() == before  # the same seed builds the same bytes


def test_model_loads_with_the_tiny_shape(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = model.config
    assert config.model_type == "qwen3"
    assert (config.num_hidden_layers, config.hidden_size) == (SHAPE["num_hidden_layers"], SHAPE["hidden_size"])
    assert config.tie_word_embeddings is True
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()
    assert embeddings.std().item() == pytest.approx(EMBED_STD, rel=0.05)


def test_tokenizer_speaks_chatml(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(tiny_model)
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The markers are single special tokens, not spelled out in pieces.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


@pytest.mark.slow
def test_llama_cpp_tokenizes_chat_text_exactly_as_transformers(
    tiny_model: Path, tiny_gguf: Path, demo_data: tuple[Path, Path]
) -> None:
    """The GGUF (llama.cpp's converter, which must recognise the vocabulary's pre-tokenizer) gives the token ids
    training used, on whole chat-formatted demo conversations: markup, prices, names, JSON, whitespace."""
    from transformers import AutoTokenizer

    from tunepipe.tasks.demo.tiny_model import VOCAB
    from tunepipe.tasks.integrations.llama_cpp import load_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in demo_data[1].read_text().splitlines()[:16]]
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "Extract the product as JSON."},
                {"role": "user", "content": row["input"]},
                {"role": "assistant", "content": json.dumps(row["output"], separators=(",", ":"))},
            ],
            tokenize=False,
        )
        for row in rows
    ]
    texts.append("<|im_start|>user\nWhat can you do?  Ünïcode 🦙\t3.14\n\n<|im_end|>\n<|im_start|>assistant\n")
    llm = load_gguf(tiny_gguf, n_ctx=512, vocab_only=True)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == VOCAB
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
        for text in texts:
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=True)
                == tokenizer(text, add_special_tokens=False)["input_ids"]
            ), text
    finally:
        llm.close()
