"""transformers' private names and version-specific layers, for evaluation's greedy decoder
(`tasks/chat/generation.py`).

- `attention_implementation`: the model's attention implementation as transformers records it. transformers 5.17
  has a public setter (`set_attn_implementation`) but no public getter, only `config._attn_implementation`;
  the decoder reads it to check the model attends through SDPA before switching it to its grouped attention,
  and to put it back on a model that goes on training.
- `use_fused_norms`: the RMSNorm layers' `forward` replaced, on the instance, by torch's one-kernel `rms_norm`.
  It relies on transformers' RMSNorm classes (their name and `variance_epsilon`), and each switched layer is
  checked against its own forward on a probe input.

Off (another transformers, or `TUNEPIPE_PATCHES`), the decoder keeps the attention and norms the model was loaded
with (transformers' SDPA path and RMSNorm forwards): the same answers, at the public path's speed.
"""

from __future__ import annotations

import functools

from tunepipe.tasks.patches import enabled

PROVEN = "==5.17.0"


def attention_implementation(model) -> str | None:
    """The attention implementation `model` runs (e.g. "sdpa"), or None when the patches are off."""
    if not enabled("transformers", PROVEN):
        return None
    return model.config._attn_implementation


def use_fused_norms(model) -> int:
    """Run the model's RMSNorm layers as torch's one-kernel `rms_norm`; returns how many were switched (none when
    the patches are off).

    transformers' RMSNorm is about eight small kernels (upcast, square, mean, rsqrt, multiplies, downcast), four
    of them a Qwen3 layer, so in a batched decode step they are a large share of the kernel launches. A layer is
    switched only when the fused kernel gives its output on a probe input (within bf16 rounding), so a variant
    with another formula (Gemma's `1 + weight`, say) keeps its own forward.
    """
    if not enabled("transformers", PROVEN):
        return 0
    import torch

    switched = 0
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        if not type(module).__name__.endswith("RMSNorm") or weight is None or weight.ndim != 1 or eps is None:
            continue
        with torch.no_grad():
            seeded = torch.Generator(weight.device).manual_seed(0)  # leaves the global RNG alone
            probe = torch.randn(4, weight.shape[0], generator=seeded, device=weight.device).to(weight.dtype)
            expected = module(probe)
            module.forward = functools.partial(_fused_rms_norm, module)
            if torch.allclose(module(probe), expected, rtol=2e-2, atol=2e-2):
                switched += 1
            else:
                del module.forward  # back to the class's own
    return switched


def unfuse_norms(model) -> None:
    """Put back the class's own forward on every layer `use_fused_norms` switched."""
    for module in model.modules():
        fused = module.__dict__.get("forward")
        if isinstance(fused, functools.partial) and fused.func is _fused_rms_norm:
            del module.forward


def _fused_rms_norm(module, hidden):
    import torch

    return torch.nn.functional.rms_norm(hidden, module.weight.shape, module.weight, module.variance_epsilon)
