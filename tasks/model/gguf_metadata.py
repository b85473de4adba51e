"""What a GGUF says of itself, as llama.cpp reads it: its key-value metadata, what identifies its vocabulary (a
source GGUF's and the one exported from it must agree), and whether its weights are quantized below q8_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunepipe.tasks.integrations.llama_cpp import load_gguf

# llama.cpp's `general.file_type` values (llama.h) that keep at least 8 bits per weight.
HIGH_PRECISION_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}
FILE_TYPE_NAMES = {
    2: "q4_0",
    3: "q4_1",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    11: "q3_k_s",
    12: "q3_k_m",
    13: "q3_k_l",
    14: "q4_k_s",
    15: "q4_k_m",
    16: "q5_k_s",
    17: "q5_k_m",
    18: "q6_k",
    **HIGH_PRECISION_FILE_TYPES,
}


@dataclass(frozen=True)
class GgufVocab:
    """What identifies a GGUF's tokenizer for llama.cpp."""

    model: str | None  # tokenizer.ggml.model: gpt2 (byte-level BPE), llama (SentencePiece), ...
    pre: str | None  # tokenizer.ggml.pre: the pre-tokenizer llama.cpp applies
    size: int
    special: dict[str, str]  # bos/eos/padding/unknown/eot token ids and the add_bos/add_eos flags

    def differences(self, other: GgufVocab) -> list[str]:
        """One line per field in which `other` (the exported GGUF's) differs from this vocabulary."""
        lines = [
            f"{field} {getattr(self, field)!r} became {getattr(other, field)!r}"
            for field in ("model", "pre", "size")
            if getattr(self, field) != getattr(other, field)
        ]
        return lines + [
            f"{key} {self.special.get(key)!r} became {other.special.get(key)!r}"
            for key in sorted(self.special.keys() | other.special.keys())
            if self.special.get(key) != other.special.get(key)
        ]


def read_gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's key-value metadata as llama.cpp reads it (values as text, arrays left out), and `vocab_size`.

    llama.cpp reads a vocabulary-only load in a second; gguf-py's reader takes tens of seconds on Gemma's
    262,144 tokens."""
    import llama_cpp

    llm = load_gguf(path, vocab_only=True)
    try:
        vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        return {**llm.metadata, "vocab_size": str(vocab_size)}
    finally:
        llm.close()


SPECIAL_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "eot_token_id",
    "padding_token_id",
    "unknown_token_id",
    "add_bos_token",
    "add_eos_token",
)


def gguf_vocab(meta: dict[str, str]) -> GgufVocab:
    special = {
        key.removesuffix("_id"): meta[f"tokenizer.ggml.{key}"]
        for key in SPECIAL_KEYS
        if f"tokenizer.ggml.{key}" in meta
    }
    return GgufVocab(
        model=meta.get("tokenizer.ggml.model"),
        pre=meta.get("tokenizer.ggml.pre"),
        size=int(meta["vocab_size"]),
        special=special,
    )


def quantization_warning(path: Path, meta: dict) -> str | None:
    """A warning when the GGUF's weights are quantized below q8_0: their rounding is what gets fine-tuned."""
    file_type = int(meta.get("general.file_type", -1))
    if file_type in HIGH_PRECISION_FILE_TYPES:
        return None
    kind = FILE_TYPE_NAMES.get(file_type, f"file type {file_type}")
    return (
        f"{path.name} is quantized as {kind}, below q8_0: training starts from its dequantized weights, so "
        "its rounding is baked into the fine-tuned model. Start from an f16, bf16 or q8_0 GGUF where you "
        "have one."
    )
