"""Host memory of the export's adapter merge: shard by shard (`tasks/export/merge.py`) against peft's
`merge_and_unload` + `save_pretrained` (what export did before), on a random-weight model of a real shape.

Each merge runs in a process of its own, sampled every 20 ms from /proc: the peak of its anonymous memory (what
it allocated) and of its resident file pages (the memory-mapped shards; the kernel drops them under pressure),
and VmHWM, the kernel's own peak of both together. The adapter is LoRA r=16 on all seven projections with
random weights (as after training). The merged folders of both ways are compared tensor by tensor.

    python benchmarks/merge_memory.py --shape qwen2.5-1.5b --work /tmp/merge-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, work: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (base / ".complete").exists():
        return base, adapter
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape]))
    model.save_pretrained(base, max_shard_size="2GB")
    peft_model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(adapter)
    (base / ".complete").write_text("")
    return base, adapter


def shard_merge(base: str, adapter: str, out: str) -> None:
    from tunepipe.tasks.export.merge import merge_shards

    merge_shards(Path(adapter), Path(base), Path(out))


def peft_merge(base: str, adapter: str, out: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
    model.merge_and_unload().save_pretrained(out)


def measured(function: str, *args: str) -> dict:
    """Run `function(*args)` of this module in a new process, sampling its memory."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import merge_memory; "
        f"merge_memory.{function}(*{list(args)!r})"
    )
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code])
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}

    def sample():
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = process.wait()
    sampler.join()
    return {
        "function": function,
        "exit": code,
        "seconds": round(time.perf_counter() - started, 1),
        **{f"{key}_gib": round(kib / 2**20, 2) for key, kib in peaks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-1.5b")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, adapter = build(args.shape, args.work)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(
        json.dumps(
            {
                "shape": args.shape,
                "base_gib": round(size / 2**30, 2),
                "largest_shard_gib": round(max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30, 2),
                "build_s": round(time.perf_counter() - started, 1),
            }
        ),
        flush=True,
    )
    rows = [
        measured("shard_merge", str(base), str(adapter), str(args.work / "shard-merged")),
        measured("peft_merge", str(base), str(adapter), str(args.work / "peft-merged")),
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, framework="pt") as f:
                # safe_open is no mapping: it has keys() but cannot be iterated
                found.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
        return found

    ours, peft = tensors(args.work / "shard-merged"), tensors(args.work / "peft-merged")
    equal = sum(torch.equal(ours[name], peft[name]) for name in ours if name in peft)
    print(json.dumps({"tensors": len(ours), "in_both": len(set(ours) & set(peft)), "equal": equal}), flush=True)


if __name__ == "__main__":
    main()
