"""Which examples a step trains on, and how a micro-batch of them becomes the model's inputs.

A step's examples depend on the step number alone (a seeded permutation per epoch, `ExampleOrder`), so a resumed
run trains on what an uninterrupted one would. A micro-batch becomes tensors by one of three strategies, chosen in
`make_batch`: padded rows, packed rows (first fit), or one packed row in the run's `PackedLayout`. Next-token
targets never cross an example's end, and where the loss is (`loss_at`, `loss_targets`, `loss_example`) is found
on the host, so the step selects those positions on the GPU without waiting for it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from tunepipe.tasks.data.format import IGNORE
from tunepipe.tasks.train.results import Backend


class ExampleOrder:
    """Which examples step N trains on: a seeded shuffle per epoch, so it depends on N alone (exact resume)."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed, self.epochs = n_rows, seed, {}

    def step(self, step: int, per_step: int) -> list[int]:
        start = (step - 1) * per_step
        return [self._at(i) for i in range(start, start + per_step)]

    def _at(self, position: int) -> int:
        import torch

        epoch, index = divmod(position, self.n_rows)
        if epoch not in self.epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.epochs = {epoch: torch.randperm(self.n_rows, generator=generator).tolist()}
        return self.epochs[epoch][index]


def step_counts(cfg, n_rows: int, world: int) -> tuple[int, int, int]:
    """(examples a step trains on, over all ranks; SFT's steps; the preference phase's steps, after SFT's).
    `kto` and `dpo` alone have no SFT steps."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    sft = 0 if cfg.objective in ("kto", "dpo") else cfg.max_steps or math.ceil(cfg.epochs * n_rows / per_step)
    return per_step, sft, 0 if cfg.objective == "sft" else cfg.preference.max_steps


def n_loss_tokens(row: dict) -> int:
    return sum(label != IGNORE for label in row["labels"][1:])


def packs(packing: bool, backend: Backend, device) -> bool:
    """Whether micro-batches are packed (`train.packing`): always on hf; on unsloth where it attends within packed
    examples in one kernel call (`tunepipe.tasks.patches.unsloth.unsloth_packs`), otherwise they are padded."""
    if not packing or backend == "hf":
        return packing
    from tunepipe.tasks.patches.unsloth import unsloth_packs

    if unsloth_packs(device):
        return True
    print(
        "train: unsloth backend without torch's varlen attention on this GPU: micro-batches are padded "
        "(sorted by length), not packed",
        flush=True,
    )
    return False


def row_tokens(backend: Backend, max_seq_length: int) -> int | None:
    """The longest packed row. hf masks packed rows with a dense block-diagonal mask, so its rows stay short;
    unsloth masks packed examples only in a one-row batch, through a varlen kernel that costs nothing per masked
    pair (None: a micro-batch is one row)."""
    return max_seq_length if backend == "hf" else None


# ------------------------------------------------------------------------------------------- the packed layout


@dataclass(frozen=True)
class PackedLayout:
    """One shape for every packed micro-batch of a run, so that CUDA graphs can replay them
    (`tasks/train/graphs.py`): one row of `width` tokens in `segments` blocks, none longer than `longest`. A
    micro-batch's examples come first, then its padding in blocks of at most `longest` tokens (the attention
    kernel is told no block is longer), then empty blocks up to `segments`."""

    width: int
    segments: int
    longest: int

    def blocks(self, lengths: list[int]) -> list[int] | None:
        """The row's block lengths for these examples, or None when they do not fit."""
        pad = self.width - sum(lengths)
        if pad < 0 or max(lengths) > self.longest:
            return None
        blocks = lengths + [self.longest] * (pad // self.longest) + ([pad % self.longest] if pad % self.longest else [])
        return blocks + [0] * (self.segments - len(blocks)) if len(blocks) <= self.segments else None


def packed_layout(micro_batches: list[list[int]], max_padding: float = 0.25) -> PackedLayout | None:
    """The layout that holds every one of a run's packed micro-batches (their example lengths), or None when
    padding them all to the widest would cost more than `max_padding` of the tokens the transformer runs
    (replaying a graph saves less than that on launches), or when fewer than two micro-batches are packed."""
    packed = [lengths for lengths in micro_batches if len(set(lengths)) > 1]  # make_batch packs these alone
    if len(packed) < 2:
        return None
    width = max(sum(lengths) for lengths in packed)
    if 1 - sum(sum(lengths) for lengths in packed) / (width * len(packed)) > max_padding:
        return None
    longest = max(max(lengths) for lengths in packed)
    segments = max(len(lengths) + math.ceil((width - sum(lengths)) / longest) for lengths in packed)
    return PackedLayout(width=width, segments=segments, longest=longest)


def micro_batch_lengths(
    rows: list[dict], order: ExampleOrder, steps: range, per_step: int, micro_batch_size: int
) -> list[list[int]]:
    """The example lengths of every micro-batch these steps will run (one device; packed micro-batches keep the
    step's order), for the packed layout."""
    lengths = []
    for step in steps:
        examples = [len(rows[i]["input_ids"]) for i in order.step(step, per_step)]
        lengths += [examples[start : start + micro_batch_size] for start in range(0, per_step, micro_batch_size)]
    return lengths


def run_layout(
    rows: list[dict], order: ExampleOrder, steps: range, per_step: int, micro_batch_size: int
) -> PackedLayout | None:
    """The packed layout of the run's remaining steps, announced when there is one."""
    layout = packed_layout(micro_batch_lengths(rows, order, steps, per_step, micro_batch_size))
    if layout:
        print(
            f"train: packed micro-batches laid out as one row of {layout.width} tokens in {layout.segments} "
            f"blocks (padding included), so that CUDA graphs replay them",
            flush=True,
        )
    return layout


# ------------------------------------------------------------------------------------------ micro-batches


def make_batch(
    rows: list[dict],
    packing: bool,
    pad_id: int,
    device,
    row_tokens: int | None = None,
    layout: PackedLayout | None = None,
) -> dict:
    """Model inputs and next-token targets of `rows`, by one of three strategies:

    - `padded`: one example a row (without packing, or when the examples share one length: packing would then
      remove no padding and cost a block mask or, on unsloth, a copy of every layer's attention output);
    - `packed_in_layout`: one row of the run's layout, when the examples fit it;
    - `packed_first_fit`: rows of at most `row_tokens` tokens otherwise.
    """
    lengths = [len(row["input_ids"]) for row in rows]
    if not packing or len(set(lengths)) == 1:
        return padded(rows, pad_id, device)
    blocks = layout.blocks(lengths) if layout else None
    if blocks is not None:
        return packed_in_layout(rows, blocks, pad_id, device)
    return packed_first_fit(rows, row_tokens, pad_id, device)


def padded(rows: list[dict], pad_id: int, device) -> dict:
    """One example a row, right-padded, with an attention mask only where a row is padded: rows of equal length
    need none, and without one attention stays on the causal kernels (flash / varlen)."""
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    pad = [width - n for n in lengths]
    batch = {
        "input_ids": [row["input_ids"] + [pad_id] * n for row, n in zip(rows, pad)],
        "targets": [_targets(row) + [IGNORE] * n for row, n in zip(rows, pad)],
        "example": [[i] * (width - n) + [-1] * n for i, n in enumerate(pad)],
    }
    if any(pad):
        batch["attention_mask"] = [[1] * len(row["input_ids"]) + [0] * n for row, n in zip(rows, pad)]
    return _to_device(batch, device)


def packed_in_layout(rows: list[dict], blocks: list[int], pad_id: int, device) -> dict:
    """One row of the layout's shape (`blocks`, from `PackedLayout.blocks`): the examples in order, then the
    layout's padding blocks."""
    return _packed(rows, [list(range(len(rows)))], [blocks[len(rows) :]], pad_id, device)


def packed_first_fit(rows: list[dict], row_tokens: int | None, pad_id: int, device) -> dict:
    """Examples placed first-fit (longest first) into rows of at most `row_tokens` tokens (one row when None),
    each row padded to the widest with one block of its own. Bounded rows keep hf's dense attention mask small:
    one row of 64 short examples wastes most of its attention on masked pairs."""
    lengths = [len(row["input_ids"]) for row in rows]
    bins: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        fits = next(
            (b for b in bins if row_tokens is None or sum(lengths[j] for j in b) + lengths[i] <= row_tokens), None
        )
        if fits is None:
            bins.append([i])
        else:
            fits.append(i)
    width = max(sum(lengths[j] for j in b) for b in bins)
    paddings = [[pad] if (pad := width - sum(lengths[j] for j in b)) else [] for b in bins]
    return _packed(rows, bins, paddings, pad_id, device)


def _packed(rows: list[dict], bins: list[list[int]], paddings: list[list[int]], pad_id: int, device) -> dict:
    """Rows of the examples in `bins`, each followed by its padding blocks. Positions restart at 0 for every
    example and every padding block, so attention stays block-diagonal (transformers reads the blocks from the
    positions, unsloth from `packed_seq_lengths`)."""
    import torch

    lengths = [len(row["input_ids"]) for row in rows]
    batch = {key: [] for key in ("input_ids", "position_ids", "targets", "example")}
    blocks = []
    for b, padding in zip(bins, paddings):
        pad = sum(padding)
        batch["input_ids"].append(_joined(rows[j]["input_ids"] for j in b) + [pad_id] * pad)
        batch["position_ids"].append(_joined(range(n) for n in [lengths[j] for j in b] + padding))
        batch["targets"].append(_joined(_targets(rows[j]) for j in b) + [IGNORE] * pad)
        batch["example"].append(_joined([j] * lengths[j] for j in b) + [-1] * pad)
        blocks += [lengths[j] for j in b] + padding
    tensors = _to_device(batch, device)
    lengths_tensor = torch.tensor(blocks, dtype=torch.int32)  # pinned: copied to the GPU without a wait
    tensors["packed_seq_lengths"] = lengths_tensor.pin_memory() if device.type == "cuda" else lengths_tensor
    return tensors


def _targets(row: dict) -> list[int]:
    """Next-token targets of one example: none past its end (IGNORE there)."""
    return row["labels"][1:] + [IGNORE]


def _joined(parts) -> list[int]:
    """One list of the parts' items, in linear time (`sum(parts, [])` copies the list so far at every part)."""
    return list(itertools.chain.from_iterable(parts))


def _to_device(batch: dict[str, list[list[int]]], device) -> dict:
    """The model inputs as tensors, and where the loss is, in place of the per-token `targets` and `example`
    lists: the flat positions that carry a target, their targets and their examples (`loss_at`, `loss_targets`,
    `loss_example`). Found here on the host, so selecting them on the GPU needs no synchronisation (a boolean
    mask would wait for the forward pass to finish)."""
    import torch

    targets, examples = _joined(batch.pop("targets")), _joined(batch.pop("example"))
    loss_at = [i for i, target in enumerate(targets) if target != IGNORE]
    batch |= {
        "loss_at": loss_at,
        "loss_targets": [targets[i] for i in loss_at],
        "loss_example": [examples[i] for i in loss_at],
    }
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if device.type != "cuda":
        return tensors
    return {key: tensor.pin_memory().to(device, non_blocking=True) for key, tensor in tensors.items()}
