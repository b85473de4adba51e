"""Export the trained adapter three ways: the LoRA adapter, a merged HF model, and a GGUF for llama.cpp/Ollama.

The GGUF is made by llama.cpp's own converter (to f16/bf16) and, for quantized types, llama.cpp's quantizer
through llama-cpp-python; then llama.cpp loads it once, so a broken file fails here and not in Ollama.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.base_model import BaseModelRef
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import ExportConfig
from tasks.llama_cpp_tools import run_converter
from tasks.train import TrainResult

# llama.cpp's `llama_ftype` values for the quantizations we offer (llama.h).
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


class ExportResult(BaseModel):
    adapter_dir: Path
    merged_dir: Path
    gguf_path: Path
    gguf_quantization: str
    gguf_bytes: int


def export_model(trained: TrainResult, base: BaseModelRef, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    if trained.kind == "full":  # already a whole model: nothing to merge
        merged_dir = adapter_dir = out_dir / "merged"
        shutil.copytree(trained.adapter_dir, merged_dir, dirs_exist_ok=True)
    else:
        adapter_dir = out_dir / "adapter"
        shutil.copytree(trained.adapter_dir, adapter_dir, dirs_exist_ok=True)
        merged_dir = merge_adapter(adapter_dir, base, out_dir / "merged")

    float_type = cfg.gguf_quantization if cfg.gguf_quantization in ("f16", "bf16") else "f16"
    float_gguf = out_dir / f"model-{float_type}.gguf"
    run_converter("convert_hf_to_gguf.py", [str(merged_dir), "--outfile", str(float_gguf), "--outtype", float_type])
    gguf_path = float_gguf
    if cfg.gguf_quantization in FTYPES:
        gguf_path = out_dir / f"model-{cfg.gguf_quantization}.gguf"
        quantize(float_gguf, gguf_path, FTYPES[cfg.gguf_quantization])
        float_gguf.unlink()  # the quantized file is what gets served; the merged folder keeps full precision
    check_loads(gguf_path)
    return ExportResult(
        adapter_dir=adapter_dir, merged_dir=merged_dir, gguf_path=gguf_path,
        gguf_quantization=cfg.gguf_quantization, gguf_bytes=gguf_path.stat().st_size,
    )


def merge_adapter(adapter_dir: Path, base: BaseModelRef, merged_dir: Path) -> Path:
    """Fold the LoRA weights into the base model (in its own precision) and save it with the tokenizer."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype="auto")
    model.merge_and_unload().save_pretrained(merged_dir)
    # The adapter folder's tokenizer carries the chat template the model was trained with.
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
    return merged_dir


def quantize(source: Path, target: Path, ftype: int) -> None:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} (ftype {ftype})")


def check_loads(gguf_path: Path) -> None:
    from llama_cpp import Llama

    Llama(model_path=str(gguf_path), n_ctx=256, verbose=False).close()


@task(name="export", cache_policy=STAGE_CACHE, persist_result=True)
def export(trained: TrainResult, base: BaseModelRef, cfg: ExportConfig, workdir: Path) -> ExportResult:
    return export_model(trained, base, cfg, stage_dir(workdir, "export", trained, base, cfg))
