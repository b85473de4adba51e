"""unsloth's private names: its varlen attention kernel and its cache of packed rows' boundaries.

- `unsloth_packs`: whether unsloth attends within packed examples in one kernel call (torch's `varlen_attn`,
  flash, on an Ampere or newer GPU), handing it torch 2.11's kernel (`tunepipe.tasks.patches.torch`) where unsloth found
  none (`attention_dispatch._TORCH_VARLEN_ATTN`). Otherwise unsloth would attend one run of equal example
  lengths at a time, slower than padding (benchmarks/RESULTS.md, training speed), and micro-batches are padded.
- `PackedBoundaries`: packed rows' example boundaries kept on the GPU in unsloth's own cache
  (`packing._PACKED_INFO_CACHE`), so that CUDA graphs replay packed rows (`tasks/train/graphs.py`).

Off (another unsloth, or `TUNEPIPE_PATCHES`), `unsloth_packs` is False before any of these names is read: no
packing on unsloth (padded micro-batches), hence no packed layout and no graphs over unsloth's cache. unsloth is
imported here only inside functions that run on CUDA; the CPU path never imports it.
"""

from __future__ import annotations

from tunepipe.tasks.patches import enabled

PROVEN = "==2026.10.5"


def unsloth_packs(device) -> bool:
    """Whether unsloth attends within packed examples in one kernel call: torch's `varlen_attn` (flash) on an
    Ampere or newer GPU, unsloth being a version these patches were proven on."""
    if device.type != "cuda" or not enabled("unsloth", PROVEN):
        return False
    import torch

    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    from unsloth.utils import attention_dispatch

    from tunepipe.tasks.patches.torch import varlen_attn_with_gqa

    if attention_dispatch._TORCH_VARLEN_ATTN is None:
        attention_dispatch._TORCH_VARLEN_ATTN = varlen_attn_with_gqa(device)
    return attention_dispatch._TORCH_VARLEN_ATTN is not None


class PackedBoundaries:
    """A packed row's example boundaries on the GPU, where captured graphs read them.

    unsloth turns a packed row's `packed_seq_lengths` into boundaries by copying them to the GPU and reading the
    longest back, neither of which a capture takes, and keeps the result per device for that tensor object. So
    the captured pass is given one fixed tensor, `key`, and unsloth's entry for it is set to buffers on the GPU
    that every row's lengths are copied into before the graphs replay, with the layout's longest block as the
    longest length (flash attention takes any bound at least that long). Eager passes keep their own lengths.
    Made only where `unsloth_packs` said yes (a packed layout needs packing).
    """

    def __init__(self, layout, device):
        import torch
        from unsloth.utils import attention_dispatch, packing

        self.cache = packing._PACKED_INFO_CACHE  # {device: {"seq_lengths": tensor, "result": (...)}}
        kernel = attention_dispatch._TORCH_VARLEN_ATTN  # None: unsloth never attends through varlen here
        if kernel is not None and not isinstance(kernel, _CountedKernel):
            kernel = attention_dispatch._TORCH_VARLEN_ATTN = _CountedKernel(kernel)
        self.kernel = kernel
        self.key = torch.zeros(layout.segments, dtype=torch.int32)
        self.lengths = torch.zeros(layout.segments, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.zeros(layout.segments + 1, dtype=torch.int32, device=device)
        self.entry = {"seq_lengths": self.key, "result": (self.lengths, self.cu_seqlens, layout.longest)}

    def load(self, lengths) -> None:
        import torch

        self.key.copy_(lengths)  # what unsloth would compute the boundaries from, were its entry dropped
        self.lengths.copy_(lengths, non_blocking=True)
        torch.cumsum(self.lengths, 0, dtype=torch.int32, out=self.cu_seqlens[1:])
        self.cache[self.lengths.device] = self.entry

    def varlen_calls(self) -> int:
        return self.kernel.calls if self.kernel is not None else 0


class _CountedKernel:
    """unsloth's varlen attention kernel (installed once per process), counting its calls."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.kernel(*args, **kwargs)
