"""Fold a LoRA adapter into the 16-bit base it was trained from, one tensor at a time.

peft's `merge_and_unload` needs the whole base in host memory (and `save_pretrained` then serialises every
shard into one more copy): for a 7-8B model that is 15-30 GB of RAM before the GGUF converter starts. Here
each safetensors shard of the base is read tensor by tensor (memory-mapped), each weight a LoRA module
targets gets its delta `B @ A x scaling` exactly as peft computes it (in float32, added to the weight and rounded
once to its dtype), and the tensor is written straight into the merged shard, whose header is known beforehand
(merging changes no shape or dtype). Host memory stays near the largest tensor plus the adapter.

A QLoRA adapter was trained against the 4-bit base (NF4, dequantized in each forward pass); it is merged here
into the 16-bit base that QLoRA quantized, as Unsloth and peft do, so the exported model is the 16-bit base
plus the trained delta. What that changes against the 4-bit model the evaluation scored is measured by the
parity stage: each GGUF's answers against the evaluation's scores (`export.max_drop`).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

# safetensors' dtype names (the format's specification) for the dtypes a checkpoint holds.
DTYPE_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
PEFT_PREFIX = "base_model.model."
# Files of the base model folder the merged folder keeps (the weights are written, the tokenizer comes from the
# adapter folder).
MODEL_FILES = ("config.json", "generation_config.json")


class MergeError(ValueError):
    """The adapter or the base cannot be merged shard by shard; the message says what and where."""


def base_shards(base_dir: Path) -> list[Path]:
    """The base's safetensors files, in the index's order."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [base_dir / name for name in names]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise MergeError(
        f"{base_dir}: no model.safetensors or model.safetensors.index.json; the adapter is merged "
        "into safetensors weights only (convert a .bin checkpoint with transformers' save_pretrained)"
    )


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple], dict]:
    """{base weight name: (A, B, scaling)} and {base tensor name: replacement} (trained biases) of the adapter."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [
        name
        for name, value in (
            ("use_dora", config.get("use_dora")),
            ("fan_in_fan_out", config.get("fan_in_fan_out")),
            ("modules_to_save", config.get("modules_to_save")),
        )
        if value
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise MergeError(
            f"{adapter_dir}: only plain LoRA adapters merge here (found "
            f"{config.get('peft_type')} {', '.join(unsupported)})"
        )
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict] = {}
    replaced = {}
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                module = name.split(f".{part}.")[0]
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            replaced[name] = tensor
    deltas = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise MergeError(f"{adapter_dir}: {module} has {', '.join(pair)} only")
        short = module.split(".")[-1]
        rank = config.get("rank_pattern", {}).get(short, config["r"])
        alpha = config.get("alpha_pattern", {}).get(short, config["lora_alpha"])
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        deltas[f"{module}.weight"] = (pair["lora_A"], pair["lora_B"], scaling)
    return deltas, replaced


def merged_tensor(weight, a, b, scaling: float):
    """`weight` plus the LoRA delta as peft's `merge` computes it: its adapter weights are float32 (peft keeps
    them so on a 16-bit base), B @ A scaled in float32, added to the weight in float32 and rounded once."""
    import torch

    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    return (weight.to(torch.float32) + delta).to(weight.dtype)


def merge_shards(adapter_dir: Path, base_dir: Path, merged_dir: Path) -> Path:
    """Write base + adapter to `merged_dir` as safetensors shards named as the base's, plus its config files."""
    from safetensors import safe_open

    deltas, replaced = lora_deltas(adapter_dir)
    merged_dir.mkdir(parents=True, exist_ok=True)
    found = set()
    for shard in base_shards(base_dir):
        with safe_open(shard, framework="pt") as source:
            names = list(source.keys())
            found.update(name for name in names if name in deltas or name in replaced)

            def tensor(name: str, source=source):
                value = source.get_tensor(name)
                if name in replaced:  # a trained bias, in the base's dtype as peft's merged model keeps it
                    value = replaced[name].to(value.dtype)
                return merged_tensor(value, *deltas[name]) if name in deltas else value

            header = {name: (source.get_slice(name).get_dtype(), source.get_slice(name).get_shape()) for name in names}
            write_safetensors(merged_dir / shard.name, header, tensor, source.metadata())
    missing = sorted((set(deltas) | set(replaced)) - found)
    if missing:
        raise MergeError(
            f"the adapter in {adapter_dir} names tensors the base in {base_dir} does not have: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    for name in (*MODEL_FILES, "model.safetensors.index.json"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, merged_dir / name)
    return merged_dir


def write_safetensors(path: Path, header: dict[str, tuple[str, list[int]]], tensor, metadata: dict | None) -> None:
    """A safetensors file whose tensors `tensor(name)` produces one at a time, in `header`'s order (dtype name,
    shape), written as produced: the library's `save_file` holds every tensor and a bytes copy of each."""
    import torch

    sizes = {
        "F64": 8,
        "I64": 8,
        "F32": 4,
        "I32": 4,
        "F16": 2,
        "BF16": 2,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "BOOL": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
    }
    entries, offset = {}, 0
    for name, (dtype, shape) in header.items():
        size = sizes[dtype]
        for dim in shape:
            size *= dim
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": metadata or {"format": "pt"}, **entries}, separators=(",", ":"))
    text += " " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    partial = path.with_suffix(".partial")
    with partial.open("wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text.encode())
        for name, entry in entries.items():
            value = tensor(name).contiguous()
            if (
                DTYPE_NAMES[str(value.dtype).removeprefix("torch.")] != entry["dtype"]
                or list(value.shape) != entry["shape"]
            ):
                raise MergeError(
                    f"{name}: merged to {value.dtype} {list(value.shape)}, header says "
                    f"{entry['dtype']} {entry['shape']}"
                )
            out.write(value.reshape(-1).view(torch.uint8).numpy().data)
            del value
    partial.replace(path)
