"""Train, validation and test: each question's side decided by a stable hash of the seed and the question alone,
so it keeps its side on every run and every RAG snapshot.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.chat.examples import Example, Message
from tasks.data.results import HeldOutSplit, Side
from tasks.data.shapes import example_id
from tasks.runtime.config import DataConfig


def _split_key(seed: int, id_: str) -> float:
    """A per-id number in [0, 1) fixed by the seed and the content, independent of file order."""
    return int(hashlib.sha256(f"{seed}:{id_}".encode()).hexdigest()[:16], 16) / 2**64


def split_side(unit: str, cfg: DataConfig) -> Side:
    """The split a question belongs to, from its stable key alone: below `eval_fraction` test, in the band of
    `validation_fraction` above it validation, else train. A band whose split is given as files
    (`data.eval`, `data.validation`) stays train. The key depends on the seed and the question only, so a
    question keeps its side on every run and every RAG snapshot: a test question is never trained on later."""
    band = split_band(unit, cfg)
    return band if band != "train" and held_out_files(cfg, band) is None else "train"


def split_band(unit: str, cfg: DataConfig) -> Side:
    """The split whose band of the key `unit` falls in, whether or not that split is taken from train."""
    key = _split_key(cfg.seed, unit)
    if key < cfg.eval_fraction:
        return "test"
    return "validation" if key < cfg.eval_fraction + cfg.validation_fraction else "train"


def held_out_files(cfg: DataConfig, split: HeldOutSplit) -> Path | None:
    """The files a held-out split is given as (`data.validation`, `data.eval` for test); None: taken from train."""
    return cfg.validation if split == "validation" else cfg.eval


def split_examples(examples: list[Example], cfg: DataConfig) -> dict[Side, list[Example]]:
    """Train, validation and test examples, each distinct conversation's side decided by its id alone.

    Deciding per id (not by position) keeps duplicates on one side and keeps an example's side fixed as
    the data grows, so a retrain never trains on what an earlier run held out. When chance leaves a split
    empty, the training id with the smallest key alone goes to it (and when it leaves training empty, the id
    with the largest key alone trains). A preference example is decided by its prompt, so every rated answer
    to a held-out question is held out with it (never trained on).
    """
    units = [_split_unit(example) for example in examples]
    keys = {unit: _split_key(cfg.seed, unit) for unit in units}
    sides = {unit: split_side(unit, cfg) for unit in keys}
    if len(sides) >= 2 and "train" not in sides.values():
        sides[max(keys, key=keys.__getitem__)] = "train"
    for split in ("test", "validation"):
        training = [unit for unit, side in sides.items() if side == "train"]
        if held_out_files(cfg, split) is None and split not in sides.values() and len(training) >= 2:
            sides[min(training, key=keys.__getitem__)] = split
    return {split: [example for example, unit in zip(examples, units) if sides[unit] == split]
            for split in ("train", "validation", "test")}


def _split_unit(example: Example) -> str:
    return example.id if example.kind == "sft" else prompt_unit(example.prompt)


def prompt_unit(prompt: list[Message]) -> str:
    """What a preference example's side of the split is decided by: its prompt."""
    return "prompt:" + example_id(prompt)
