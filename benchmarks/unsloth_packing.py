"""Unsloth packed against padded, in one process and in turn: where a packed micro-batch's time goes.

Unsloth's Qwen3-0.6B-shaped model (random weights, `gpu_train.build_model`) with LoRA r=16 on all seven
projections, the demo's first 64 formatted examples as one micro-batch; packed (one row, torch's varlen
attention through `tunepipe.tasks.patches.unsloth.unsloth_packs`) and padded (length-sorted) in turn, each 3 warm-up and
10 timed forward + backward passes through `token_losses` (the training loop's head and loss; no optimizer
step). Counts how unsloth dispatched attention (varlen calls, per-segment SDPA, dense masks), then one pass of
each under torch's profiler. CUDA and unsloth only.

    python benchmarks/unsloth_packing.py ggml-vocab-qwen2.gguf
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import unsloth  # noqa: F401  (before transformers: it patches it)
from gpu_train import build_model, demo_split
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile
from unsloth import FastLanguageModel
from unsloth.utils import attention_dispatch

from tunepipe.tasks.patches.unsloth import unsloth_packs
from tunepipe.tasks.runtime.config import ModelConfig
from tunepipe.tasks.train.batching import make_batch
from tunepipe.tasks.train.stepper import token_losses

work = Path(tempfile.mkdtemp())
folder = build_model(Path(sys.argv[1]), work / "model")
rows = demo_split(ModelConfig(base=str(folder), max_seq_length=512), work).rows()[:64]
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=str(folder), max_seq_length=512, dtype=torch.bfloat16, load_in_4bit=False
)
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    lora_alpha=16,
    use_gradient_checkpointing=False,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
device = torch.device("cuda")
print("packs:", unsloth_packs(device))

counts = {"varlen": 0, "segments": 0, "sdpa_mask": 0}


def counted(name, function):
    def call(*args, **kwargs):
        counts[name] += 1
        return function(*args, **kwargs)

    return call


attention_dispatch._TORCH_VARLEN_ATTN = counted("varlen", attention_dispatch._TORCH_VARLEN_ATTN)
attention_dispatch._sdpa_packed_segments = counted("segments", attention_dispatch._sdpa_packed_segments)
attention_dispatch.build_sdpa_packed_attention_mask = counted(
    "sdpa_mask", attention_dispatch.build_sdpa_packed_attention_mask
)
q = torch.empty(1, 16, 128, 128, device=device, dtype=torch.bfloat16)
k = torch.empty(1, 8, 128, 128, device=device, dtype=torch.bfloat16)
print(
    "SDPA's choice, grouped:",
    SDPBackend(torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=True)),
    "not grouped:",
    SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)),
)
lengths = [len(row["input_ids"]) for row in rows]
print("tokens", sum(lengths), "longest", max(lengths), "distinct lengths", len(set(lengths)))


def forward_backward(packing: bool) -> None:
    ordered = rows if packing else sorted(rows, key=lambda row: len(row["input_ids"]))
    batch = make_batch(ordered, packing, tokenizer.pad_token_id, device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, _, _ = token_losses(model, batch, "unsloth", head_chunk=1177)
    total.backward()


for packing in (True, False, True, False):
    counts.update(dict.fromkeys(counts, 0))
    for _ in range(3):
        forward_backward(packing)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        forward_backward(packing)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 10
    print(
        f"packed={packing}: {seconds * 1000:.1f} ms a micro-batch, {sum(lengths) / seconds:,.0f} tokens/s; "
        f"calls over 13 passes {counts}"
    )
for packing in (True, False):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        forward_backward(packing)
        torch.cuda.synchronize()
    print(f"=== packed={packing}")
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
