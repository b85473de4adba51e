"""The training loop's unsloth path on a CUDA GPU (skipped elsewhere: unsloth imports only where CUDA is):
packed micro-batches attend within their examples only, like the hf path's test in test_training.py."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from tasks.train.loop import IGNORE

LENGTHS = (37, 90, 12, 64, 90, 25)  # two equal lengths: unsloth's per-segment fallback would group them
BF16_TOLERANCE = 2e-2  # the same example's mean loss over different batch layouts in bf16
LEAK_AT_LEAST = 5 * BF16_TOLERANCE  # a leak moves some example's loss by this much (0.06-0.2 at fp32 on the CPU)


@pytest.fixture(scope="module")
def cuda_with_unsloth():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        pytest.skip("the unsloth backend trains on a CUDA GPU only")
    import unsloth  # noqa: F401  (before transformers' models: it patches them)

    return torch.device("cuda")


def small_gqa_model(out_dir: Path) -> Path:
    """A 2-layer Qwen3 with grouped K / V heads, random weights large enough (init 0.2) that context moves the
    losses, and a word-level tokenizer: no download, no llama.cpp vocabulary."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {f"w{i}": i for i in range(512)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                        pad_token="w0", eos_token="w1", unk_token="w1")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.2, pad_token_id=0, eos_token_id=1)
    Qwen3ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_unsloth_packed_loss_equals_unpacked_loss_for_every_example(cuda_with_unsloth, tmp_path, monkeypatch):
    import torch
    from unsloth import FastLanguageModel
    from unsloth.utils import attention_dispatch

    from tasks.train import loop as training

    device = cuda_with_unsloth
    model, _ = FastLanguageModel.from_pretrained(model_name=str(small_gqa_model(tmp_path / "model")),
                                                 max_seq_length=1024, dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert training.unsloth_packs(device)
    kernel, varlen_calls = attention_dispatch._TORCH_VARLEN_ATTN, []

    def counted(*args, **kwargs):
        varlen_calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention_dispatch, "_TORCH_VARLEN_ATTN", counted)
    rng = random.Random(0)
    rows = []
    for n in LENGTHS:  # a prompt without loss, then the answer
        ids = [rng.randrange(2, 512) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3:]})

    def per_example(batch_rows: list[dict], packing: bool) -> list[float]:
        batch = training.make_batch(batch_rows, packing, 0, device)  # packed: one row, as the loop packs unsloth's
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, losses, owner = training.token_losses(model, batch, "unsloth", head_chunk=64)
        total.backward()  # the varlen kernel's backward runs too
        return [float(losses[owner == i].mean()) for i in range(len(batch_rows))]

    packed = per_example(rows, True)
    assert varlen_calls == [torch.Size([sum(LENGTHS), 4, 32])] * 2  # one call a layer, the whole row at once
    unpacked = per_example(rows, False)
    alone = [per_example([row], False)[0] for row in rows]
    print(f"packed vs padded: {max(abs(a - b) for a, b in zip(packed, unpacked)):.4f}; "
          f"vs alone: {max(abs(a - b) for a, b in zip(packed, alone)):.4f}")
    assert max(abs(a - b) for a, b in zip(packed, unpacked)) < BF16_TOLERANCE
    assert max(abs(a - b) for a, b in zip(packed, alone)) < BF16_TOLERANCE

    # The check sees a leak: the same examples as one plain causal sequence move the losses well past it.
    joined = {"input_ids": sum((r["input_ids"] for r in rows), []), "labels": sum((r["labels"] for r in rows), [])}
    batch = training.make_batch([joined], False, 0, device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, losses, _ = training.token_losses(model, batch, "unsloth", head_chunk=64)
    leaky, start = [], 0
    for row in rows:  # every example starts with a prompt, so no loss crosses into the next one
        n = sum(label != IGNORE for label in row["labels"][1:])
        leaky.append(float(losses[start : start + n].mean()))
        start += n
    print(f"packed vs leaky: {max(abs(a - b) for a, b in zip(packed, leaky)):.4f}")
    assert max(abs(a - b) for a, b in zip(packed, leaky)) > LEAK_AT_LEAST


def test_varlen_kernel_given_grouped_kv_heads_attends_as_with_repeated_heads(cuda_with_unsloth):
    """Where `_varlen_attn_with_gqa` hands grouped K / V heads to flash attention as they are, its outputs and
    gradients (K / V's summed over each group) are those of the same heads repeated."""
    import torch

    from tasks.train import loop as training

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    device = cuda_with_unsloth
    attend = training._varlen_attn_with_gqa(device)
    if attend is None or not training._kernel_groups_kv_heads(varlen.varlen_attn, device):
        pytest.skip("this torch's varlen_attn is missing or refuses grouped K / V heads: attend repeats them")
    torch.manual_seed(0)
    query = torch.randn(211, 16, 128, device=device, dtype=torch.bfloat16)  # Qwen3-0.6B's heads: 16 / 8
    key, value = (torch.randn(211, 8, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    bounds = torch.tensor([0, 37, 127, 140, 211], dtype=torch.int32, device=device)
    grad_out = torch.randn_like(query)

    def attention_and_grads(grouped: bool):
        q, k, v = (x.clone().requires_grad_() for x in (query, key, value))
        if grouped:
            out = attend(q, k, v, bounds, bounds, 90, 90, window_size=(-1, 0), enable_gqa=True)
        else:
            out = varlen.varlen_attn(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), bounds, bounds,
                                     90, 90, window_size=(-1, 0))
        out.backward(grad_out)
        return out, q.grad, k.grad, v.grad

    for name, grouped, repeated in zip(("out", "dq", "dk", "dv"), attention_and_grads(True),
                                       attention_and_grads(False)):
        error = float((grouped.float() - repeated.float()).abs().max() / repeated.float().abs().max())
        print(f"{name}: {error:.2e} of its largest value")
        assert error < 1e-2, name
