"""Export what training produced: the merged HF model, one GGUF per listed type, and the LoRA adapter as GGUF.

Every GGUF comes from llama.cpp's own tools, taken from the installed llama-cpp-python (no build, no network):
`convert_hf_to_gguf.py` writes the float file once, llama.cpp's quantizer makes each quantized type from it,
and `convert_lora_to_gguf.py` writes the adapter for Ollama's FROM base + ADAPTER route. Whether each GGUF
still does the task is the parity stage's question (`tasks/export/parity.py`), which loads every one of them.

LoRA training leaves an adapter, merged here into the 16-bit base one tensor at a time (`tasks/export/merge.py`:
host memory near the largest tensor, not the model twice); for QLoRA that is the 16-bit base that training
quantized. Full fine-tuning leaves a whole model folder, which is exported as it is (and has no adapter GGUF).

A model trained from a GGUF (`model.base` a .gguf file or `ollama:NAME`) must come back with the source's
vocabulary: the same tokenizer type, pre-tokenizer, size and special tokens, or the export fails naming what
differs (llama.cpp would tokenize served prompts differently from training, or not at all).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from tunepipe.tasks.export.merge import merge_shards
from tunepipe.tasks.export.results import ExportResult, GgufFile
from tunepipe.tasks.integrations.llama_cpp import run_converter
from tunepipe.tasks.model.base import keep_tokenizer_sources
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.caching import STAGE_CACHE, file_digest, stage_dir
from tunepipe.tasks.runtime.config import ExportConfig
from tunepipe.tasks.train.results import TrainResult

# llama.cpp's `llama_ftype` values for the quantizations we offer (llama.h).
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
FLOAT_TYPES = ("f16", "bf16")


def export_model(trained: TrainResult, base: BaseModelRef, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = adapter_gguf = None
    if trained.kind == "lora":  # LoRA or QLoRA: a PEFT adapter to merge
        adapter_dir = out_dir / "adapter"
        shutil.copytree(trained.adapter_dir, adapter_dir, dirs_exist_ok=True)
        merged_dir = merge_adapter(adapter_dir, base, out_dir / "merged")
        if cfg.lora_gguf:
            adapter_gguf = out_dir / "adapter.gguf"
            # Only the base's config is read, and the merged folder has the base's config: no hub access.
            run_converter(
                "convert_lora_to_gguf.py",
                ["--base", str(merged_dir), "--outfile", str(adapter_gguf), "--outtype", "f16", str(adapter_dir)],
            )
    else:
        merged_dir = trained.adapter_dir  # full fine-tuning saved a whole model (weights + tokenizer) there
    ggufs = write_ggufs(merged_dir, cfg.gguf_types, out_dir)
    if base.gguf is not None:
        check_source_vocabulary(base.gguf, ggufs[0].path)
    return ExportResult(merged_dir=merged_dir, adapter_dir=adapter_dir, ggufs=ggufs, adapter_gguf=adapter_gguf)


class VocabularyChanged(RuntimeError):
    """The exported GGUF's vocabulary is not the source GGUF's."""


def check_source_vocabulary(source: Path, exported: Path) -> None:
    """Raise VocabularyChanged unless `exported` has `source`'s vocabulary (one conversion writes every type's)."""
    from tunepipe.tasks.model.gguf_metadata import gguf_vocab, read_gguf_metadata

    differences = gguf_vocab(read_gguf_metadata(source)).differences(gguf_vocab(read_gguf_metadata(exported)))
    if differences:
        raise VocabularyChanged(
            f"{exported.name} does not have the vocabulary of the base model's GGUF {source} "
            f"(source, then exported): {'; '.join(differences)}"
        )


def write_ggufs(model_dir: Path, gguf_types: list[str], out_dir: Path) -> list[GgufFile]:
    """One GGUF per type: a float file converted once, each quantized type made from it."""
    source_type = "bf16" if "bf16" in gguf_types and "f16" not in gguf_types else "f16"
    paths = {source_type: convert(model_dir, out_dir / f"model-{source_type}.gguf", source_type)}
    for gguf_type in gguf_types:
        target = out_dir / f"model-{gguf_type}.gguf"
        if gguf_type in paths:
            continue
        if gguf_type in FLOAT_TYPES:
            paths[gguf_type] = convert(model_dir, target, gguf_type)
        else:
            paths[gguf_type] = quantize(paths[source_type], target, FTYPES[gguf_type])
    if source_type not in gguf_types:
        paths.pop(source_type).unlink()  # only the quantization source; the merged folder keeps full precision
    return [
        GgufFile(
            type=t, path=paths[t], bytes=paths[t].stat().st_size, sha256=file_digest(paths[t]).removeprefix("sha256:")
        )
        for t in gguf_types
    ]


def merge_adapter(adapter_dir: Path, base: BaseModelRef, merged_dir: Path) -> Path:
    """Fold the LoRA weights into the 16-bit base model (in its own precision; for QLoRA the base it quantized),
    shard by shard (`tasks/export/merge.py`), and save it with the tokenizer."""
    from transformers import AutoTokenizer

    merge_shards(adapter_dir, base_folder(base), merged_dir)
    # The adapter folder's tokenizer carries the chat template the model was trained with; what transformers
    # does not save comes from the base, so an adapter trained before that was kept still exports right.
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
    keep_tokenizer_sources(base.name_or_path, merged_dir, base.revision)
    return merged_dir


def base_folder(base: BaseModelRef) -> Path:
    """The base's local folder: itself, or its hub snapshot (from the cache training filled)."""
    if Path(base.name_or_path).is_dir():
        return Path(base.name_or_path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(base.name_or_path, revision=base.revision, allow_patterns=["*.json", "*.safetensors"])
    )


def convert(model_dir: Path, target: Path, float_type: str) -> Path:
    run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(target), "--outtype", float_type])
    return target


def quantize(source: Path, target: Path, ftype: int) -> Path:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} (ftype {ftype})")
    return target


@task(name="export", cache_policy=STAGE_CACHE, persist_result=True)
def export(trained: TrainResult, base: BaseModelRef, cfg: ExportConfig, workdir: Path) -> ExportResult:
    return export_model(trained, base, cfg, stage_dir(workdir, "export", trained, base, cfg))
