"""GGUF export + q4_k_m quantization of a Qwen3-0.6B-shaped model: tunepipe's export against llama.cpp's
converter and quantizer called directly, in the same run, alternating, on the CPU.

The model has Qwen3-0.6B's shape (28 layers, width 1024, 16/8 heads, vocab 151,936, tied embeddings, bf16
on disk) with seeded random weights and the tiny model's tokenizer (GPT-2's vocabulary; the converter pads the
embedding rows beyond it with placeholder tokens); it is built once under --work.
- baseline: `convert_hf_to_gguf.py --outtype f16`, then `llama_cpp.llama_model_quantize(...,
  LLAMA_FTYPE_MOSTLY_Q4_K_M)` called directly (not through `tunepipe.tasks.export.task`);
- tunepipe: `tunepipe.tasks.export.task.write_ggufs(model, ["q4_k_m"], out)`: the same two steps plus what the
  export stage adds (the float file removed, the GGUF's sha256 for the champion contract).
Both wall time and CPU time (this process and its children: the converter runs as a subprocess, the quantizer
in threads) are reported; on a shared machine the ratio is taken on CPU time, which other processes' load
moves far less than wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/export_gguf.py --work /tmp/bench-export --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_model(out_dir: Path) -> Path:
    if (out_dir / ".complete").exists():
        return out_dir
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tunepipe.tasks.demo.tiny_model import CACHE_NAME, build_tiny_model
    from tunepipe.tasks.integrations.llama_cpp import cache_root

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(cache_root() / CACHE_NAME))
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN3_0_6B,
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / ".complete").write_text(json.dumps(QWEN3_0_6B))
    return out_dir


def baseline(model_dir: Path, out_dir: Path) -> Path:
    """llama.cpp as its own docs run it, with none of tunepipe's code: the converter script, then llama.cpp's
    quantizer through llama-cpp-python's binding of `llama_model_quantize`."""
    import llama_cpp

    from tunepipe.tasks.integrations.llama_cpp import llama_cpp_source

    source = llama_cpp_source()  # where the converter script was unpacked (llama.cpp's own files)
    f16, q4 = out_dir / "model-f16.gguf", out_dir / "model-q4_k_m.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    subprocess.run(
        [
            sys.executable,
            str(source / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outfile",
            str(f16),
            "--outtype",
            "f16",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {f16}")
    return q4


def ours(model_dir: Path, out_dir: Path) -> Path:
    from tunepipe.tasks.export.task import write_ggufs

    (gguf,) = write_ggufs(model_dir, ["q4_k_m"], out_dir)
    return gguf.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-export"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model_dir = build_model(args.work / "qwen3-0.6b-shaped")
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    times: dict[str, list[float]] = {"llama.cpp direct": [], "tunepipe": []}
    cpu: dict[str, list[float]] = {"llama.cpp direct": [], "tunepipe": []}
    sizes = {}
    for repeat in range(args.repeats):
        for name, run in (("llama.cpp direct", baseline), ("tunepipe", ours)):
            out = args.work / f"out-{repeat}-{name.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            gguf = run(model_dir, out)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(_cpu_seconds() - cpu_start)
            sizes[name] = gguf.stat().st_size
            print(
                f"{name} #{repeat + 1}: wall {times[name][-1]:.1f} s, CPU {cpu[name][-1]:.1f} s, "
                f"{sizes[name] / 2**20:.0f} MiB",
                flush=True,
            )
            shutil.rmtree(out)
    print(
        f"\nmodel: Qwen3-0.6B shape, {weights / 2**20:.0f} MiB of bf16 safetensors; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    for label, table in (("wall", times), ("CPU", cpu)):
        for name, values in table.items():
            print(
                f"{label:>4} {name:>17}: median {statistics.median(values):.1f} s  "
                f"(runs: {', '.join(f'{v:.1f}' for v in values)})"
            )
        ratio = statistics.median(table["tunepipe"]) / statistics.median(table["llama.cpp direct"])
        print(f"{label:>4} ratio tunepipe / direct: {ratio:.3f}x (target <= 1.1x)")
    print(f"same q4_k_m size: {sizes['tunepipe'] == sizes['llama.cpp direct']}")


def _cpu_seconds() -> float:
    """User + system seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
