"""A transformers tokenizer faithful to its GGUF, and the check that it is: llama.cpp, with the GGUF's vocabulary,
must give the tokenizer's token ids.

transformers writes byte-level BPE vocabularies (`gpt2` in GGUF terms) with `byte_fallback: true`, which sends
llama.cpp's converter down its SentencePiece path (vocabulary `llama`, pre-tokenizer `default`), and the exported
GGUF aborts llama.cpp as soon as it tokenizes text; `make_faithful` puts that right, and what else transformers'
GGUF reader gets wrong for llama.cpp. llama.cpp tokenizes in a child process
(`python -m tunepipe.tasks.model.gguf_tokenizer tokenize GGUF`), since it aborts the whole process on a vocabulary
it cannot apply.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tunepipe.tasks.integrations.llama_cpp import load_gguf


def make_faithful(folder: Path, gguf: Path, meta: dict[str, str]) -> None:
    """Put right in a saved tokenizer folder what transformers' GGUF reader gets wrong for llama.cpp.

    - A byte-level BPE vocabulary (`gpt2`) maps bytes to printable characters and needs no byte fallback; the
      `byte_fallback: true` transformers writes for it makes llama.cpp's converter take it for SentencePiece.
    - The GGUF's control and user-defined tokens (Gemma's <start_of_turn>, ...) are single tokens to
      llama.cpp; transformers leaves some as plain vocabulary that its model splits into characters.
    - A SentencePiece vocabulary (`llama`) goes back into a GGUF only through a `tokenizer.model`, which
      llama.cpp's converter reads for pieces, scores and types; without one it writes a GPT-2 vocabulary.
    """
    tokens = gguf_tokens(gguf)
    # Whether llama.cpp adds BOS/EOS to a prompt: the converter reads it from tokenizer_config.json when the
    # tokenizer has no post-processor (Gemma adds BOS; without this the exported GGUF would not).
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key] = meta[f"tokenizer.ggml.{key}"] == "true"
    tokenizer_json = folder / "tokenizer.json"
    if meta.get("tokenizer.ggml.model") == "llama":
        # transformers' reader gives it no merges (words come out as single characters): build it from the
        # GGUF's own pieces and scores, as SentencePiece's BPE merges them.
        sentencepiece_tokenizer(tokens).save(str(tokenizer_json))
        write_sentencepiece_model(tokens, meta, folder / "tokenizer.model")
        # The converter types user-defined pieces (Gemma's "\n", "<span>", ...) only from here, not from
        # tokenizer.model; typed normal, llama.cpp would split them. transformers reads its added tokens from
        # here too, so the control tokens are listed as well.
        config["added_tokens_decoder"] = {
            str(i): {
                "content": text,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": bool(attr & TOKEN_CONTROL),
            }
            for i, (text, _, attr) in enumerate(tokens)
            if attr & (TOKEN_CONTROL | TOKEN_USER_DEFINED)
        }
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        return
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    state = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if meta.get("tokenizer.ggml.model") == "gpt2":
        state["model"]["byte_fallback"] = False
    added = {entry["id"] for entry in state.get("added_tokens", [])}
    for token_id, (text, _, attr) in enumerate(tokens):
        if attr & (TOKEN_CONTROL | TOKEN_USER_DEFINED) and token_id not in added:
            state.setdefault("added_tokens", []).append(
                {
                    "id": token_id,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": bool(attr & TOKEN_CONTROL),
                }
            )
    tokenizer_json.write_text(json.dumps(state, ensure_ascii=False, indent=2), encoding="utf-8")


def sentencepiece_tokenizer(tokens: list[tuple[str, float, int]]):
    """A `tokenizers` BPE tokenizer that splits text as llama.cpp's SentencePiece vocabulary does: merges ranked
    by the merged piece's score, byte fallback, control and user-defined tokens matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    vocab = {text: i for i, (text, _, _) in enumerate(tokens)}
    whole = TOKEN_CONTROL | TOKEN_USER_DEFINED
    scores = {text: score for text, score, attr in tokens if not attr & (whole | TOKEN_BYTE)}
    unk = next((text for text, _, attr in tokens if attr & TOKEN_UNKNOWN), None)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab, scores),
            unk_token=unk,
            byte_fallback=any(attr & TOKEN_BYTE for _, _, attr in tokens),
            fuse_unk=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens(
        [
            AddedToken(text, normalized=False, special=bool(attr & TOKEN_CONTROL))
            for text, _, attr in tokens
            if attr & whole
        ]
    )
    return tokenizer


# llama.cpp's token attributes (llama.h) and the SentencePiece piece types they come from.
TOKEN_UNKNOWN, TOKEN_UNUSED, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 8, 16, 32
PIECE_TYPES = ((TOKEN_UNKNOWN, 2), (TOKEN_CONTROL, 3), (TOKEN_USER_DEFINED, 4), (TOKEN_UNUSED, 5), (TOKEN_BYTE, 6))


def gguf_tokens(gguf: Path) -> list[tuple[str, float, int]]:
    """(text, score, llama.cpp attributes) of every token of the GGUF's vocabulary, by id."""
    import llama_cpp

    llm = load_gguf(gguf, vocab_only=True)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        return [
            (
                llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace"),
                llama_cpp.llama_vocab_get_score(vocab, i),
                llama_cpp.llama_vocab_get_attr(vocab, i),
            )
            for i in range(llama_cpp.llama_vocab_n_tokens(vocab))
        ]
    finally:
        llm.close()


def write_sentencepiece_model(tokens: list[tuple[str, float, int]], meta: dict[str, str], path: Path) -> None:
    """The SentencePiece model a `llama`-type GGUF vocabulary was made from: the same pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(attr & TOKEN_BYTE for _, _, attr in tokens)
    for field, key in (
        ("unk_id", "unknown_token_id"),
        ("bos_id", "bos_token_id"),
        ("eos_id", "eos_token_id"),
        ("pad_id", "padding_token_id"),
    ):
        setattr(proto.trainer_spec, field, int(meta.get(f"tokenizer.ggml.{key}", -1)))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix") == "true"
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for text, score, attr in tokens:
        piece = proto.pieces.add()
        piece.piece, piece.score = text, score
        piece.type = next((kind for flag, kind in PIECE_TYPES if attr & flag), 1)
    path.write_bytes(proto.SerializeToString())


# Chat texts whose token ids must agree between transformers and llama.cpp: markup, JSON, digits, non-ASCII,
# runs of spaces and newlines: where pre-tokenizers and byte handling differ.
SAMPLE_CONVERSATIONS = [
    [
        {"role": "system", "content": "You extract product data as JSON."},
        {"role": "user", "content": '<div itemprop="name">Zoë\'s Café  Grinder 3000</div>\n\n<span>€1,299.99</span>'},
        {"role": "assistant", "content": '{"name": "Zoë\'s Café Grinder 3000", "price": 1299.99}'},
    ],
    [
        {"role": "user", "content": "What is 12345 + 678?   Answer briefly.\tThanks! 日本語も。 🙂"},
        {"role": "assistant", "content": "12345 + 678 = 13023."},
    ],
]


class VocabularyMismatch(RuntimeError):
    """transformers and llama.cpp tokenize the same text differently; the message says where."""


def compare_token_ids(tokenizer, gguf: Path, texts: list[str], what: str) -> None:
    """Raise VocabularyMismatch unless llama.cpp, with `gguf`'s vocabulary, gives `tokenizer`'s ids for each text.

    Both see the text with special tokens parsed and nothing added, as a chat template's output is fed to them.
    """
    actual_ids, pieces = llama_cpp_token_ids(gguf, texts, what)
    for number, (text, actual) in enumerate(zip(texts, actual_ids), 1):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if actual != expected:
            at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
            raise VocabularyMismatch(
                f"{what}: text {number} ({text[:60]!r}...) tokenizes differently: from token {at} on, llama.cpp "
                f"with {gguf.name} gives {actual[at : at + 6]} ({pieces[number - 1][at : at + 6]}), transformers gives "
                f"{expected[at : at + 6]} ({tokenizer.convert_ids_to_tokens(expected[at : at + 6])}); "
                f"{len(actual)} against {len(expected)} tokens in all."
            )


def llama_cpp_token_ids(gguf: Path, texts: list[str], what: str) -> tuple[list[list[int]], list[list[str]]]:
    """llama.cpp's token ids (and their text) for each text with `gguf`'s vocabulary, special tokens parsed.

    In a child process: on a vocabulary it cannot apply (a byte-level BPE vocabulary written as SentencePiece)
    llama.cpp aborts the whole process (`std::out_of_range`), which would take the pipeline down with it.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tunepipe.tasks.model.gguf_tokenizer", "tokenize", str(gguf)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.strip().splitlines()[-2:])
        raise VocabularyMismatch(
            f"{what}: llama.cpp cannot tokenize text with {gguf.name}'s vocabulary (it exited "
            f"with status {done.returncode}: {tail})"
        )
    answer = json.loads(done.stdout)
    return answer["ids"], answer["pieces"]


def _tokenize_main(gguf: Path) -> None:
    texts = json.loads(sys.stdin.read())
    llm = load_gguf(gguf, vocab_only=True)
    ids = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    pieces = [[llm.detokenize([i], special=True).decode("utf-8", "replace") for i in row] for row in ids]
    llm.close()
    print(json.dumps({"ids": ids, "pieces": pieces}))


if __name__ == "__main__":  # `tokenize GGUF`, the texts as JSON on stdin: see llama_cpp_token_ids
    _tokenize_main(Path(sys.argv[2]))
