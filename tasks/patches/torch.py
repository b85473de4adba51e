"""torch-version-specific behaviour: torch 2.11's `varlen_attn` behind the signature later versions give it.

unsloth attends within packed examples through torch's `varlen_attn` from torch 2.12 on, whose signature has
`enable_gqa`; torch 2.11 has the kernel without that argument. `varlen_attn_with_gqa` bridges it (handed to
unsloth by `tunepipe.tasks.patches.unsloth.unsloth_packs`). Off (another torch, or `TUNEPIPE_PATCHES`), there is no
bridge: unsloth's micro-batches are padded instead of packed.
"""

from __future__ import annotations

from tunepipe.tasks.patches import enabled

PROVEN = "~=2.11.0"


def varlen_attn_with_gqa(device):
    """torch 2.11's `varlen_attn` behind torch 2.12's signature, or None (patches off, or no such kernel here).
    Flash attention groups K / V heads itself (query head h reads K / V head h // group, forward and backward), so
    grouped K / V go to the kernel as they are where this torch's wrapper lets them through and the kernel gives
    what repeated heads give; elsewhere each K / V head is repeated for its group, as SDPA does without
    `enable_gqa` (a copy of K and V a layer, kept for the backward pass)."""
    if not enabled("torch", PROVEN):
        return None
    import inspect

    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None
    if not torch.backends.cuda.is_flash_attention_available():
        return None
    groups_kv_heads = kernel_groups_kv_heads(varlen_attn, device)

    def attend(query, key, value, *args, enable_gqa: bool = False, **kwargs):  # (tokens, heads, head_dim)
        if enable_gqa and not groups_kv_heads:
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        return varlen_attn(query, key, value, *args, **kwargs)

    return attend


def kernel_groups_kv_heads(varlen_attn, device) -> bool:
    """Whether `varlen_attn` takes half as many K / V heads as query heads and attends as with each repeated:
    one call on two short causal sequences."""
    import torch

    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (
        torch.randn(8, heads, 64, generator=generator, device=device, dtype=torch.bfloat16) for heads in (4, 2, 2)
    )
    bounds = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    try:
        grouped = varlen_attn(query, key, value, bounds, bounds, 5, 5, window_size=(-1, 0))
    except (RuntimeError, ValueError):  # a wrapper that checks the head counts
        return False
    repeated = varlen_attn(
        query,
        key.repeat_interleave(2, dim=1),
        value.repeat_interleave(2, dim=1),
        bounds,
        bounds,
        5,
        5,
        window_size=(-1, 0),
    )
    return torch.allclose(grouped, repeated, rtol=0, atol=1e-2)
