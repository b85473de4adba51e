"""Load user data in any supported container and shape and normalise it to canonical `Example`s.

Containers: JSON Lines (`.jsonl`, `.ndjson`), JSON arrays (`.json`; a `.json` file of JSON Lines works too),
CSV and Parquet; a folder or glob of them; UTF-8 with or without a byte-order mark, LF or CRLF line ends.
A LLaMA-Factory data folder is read through its `dataset_info.json` (`file_name`, `formatting`, `columns`,
`tags`).

Shapes (detected per record, or named by `data.shape`):
  pairs     {"input": str, "output": str | object | array, "system"?: str, "reasoning"?: str}
  alpaca    {"instruction": str, "input"?: str, "output": ..., "system"?: str, "history"?: [[q, a], ...]}
  sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...], "system"?, "tools"?}
  openai    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  trl       {"prompt": str | [messages], "completion": str | [one assistant message], "label"?: bool} (KTO when
            labelled), {"prompt": ..., "chosen": ..., "rejected": ...} (DPO): TRL's preference formats
A JSON object or array answer is written compactly with its key order kept. Preference rows are
examples too: KTO rows carry `label` (desirable or not), DPO rows `rejected` (the chosen answer is the final
message); LLaMA-Factory's `kto_tag` column and `ranking: true` datasets (`chosen`/`rejected`) read the same way.

Nothing is dropped silently: a row that cannot be turned into a conversation becomes a `Rejection` naming
the file, the line (JSON Lines) or row (arrays, CSV, Parquet), the field and the problem, with the original
text kept, and goes to a quarantine file. A file that cannot be used at all (not UTF-8, empty, an array of
non-objects, no record of a known shape) raises `DataFileError` naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task

from tunepipe.tasks.chat.examples import Example, Message, write_jsonl
from tunepipe.tasks.data.containers import DataFileError, DataSource
from tunepipe.tasks.data.files import FileRead, fingerprint_files, read_file, resolve_sources
from tunepipe.tasks.data.results import HeldOutSplit, LoadedData, Side
from tunepipe.tasks.data.shapes import Normaliser, ShapeSpec, example_id
from tunepipe.tasks.runtime.caching import STAGE_CACHE, stage_dir
from tunepipe.tasks.runtime.config import DataConfig


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
    return {
        split: [example for example, unit in zip(examples, units) if sides[unit] == split]
        for split in ("train", "validation", "test")
    }


def _split_unit(example: Example) -> str:
    return example.id if example.kind == "sft" else prompt_unit(example.prompt)


def prompt_unit(prompt: list[Message]) -> str:
    """What a preference example's side of the split is decided by: its prompt."""
    return "prompt:" + example_id(prompt)


def data_sources(cfg: DataConfig) -> tuple[list[DataSource], list[DataSource], list[DataSource]]:
    """The train, validation and test (`data.eval`) files the config names; a split that is taken from train
    has none."""
    train = resolve_sources(cfg.train, "data.train", cfg.datasets)
    validation = [] if cfg.validation is None else resolve_sources(cfg.validation, "data.validation", cfg.datasets)
    test = [] if cfg.eval is None else resolve_sources(cfg.eval, "data.eval", cfg.datasets)
    return train, validation, test


def data_fingerprint(cfg: DataConfig) -> str:
    """Content hash of the configured data files, their shapes and the data section: the dataset's identity."""
    sources = [source for split in data_sources(cfg) for source in split]
    extra = json.dumps([cfg.model_dump(mode="json"), [s.model_dump(mode="json") for s in sources]])
    return fingerprint_files([s.path for s in sources], extra)


def read_sources(sources: list[DataSource], normaliser: Normaliser) -> list[FileRead]:
    """Read every file; the files that cannot be used are all named in one DataFileError."""
    reads, unusable = [], []
    for source in sources:
        try:
            reads.append(read_file(source, normaliser))
        except DataFileError as exc:
            unusable.append(str(exc))
    if unusable:
        raise DataFileError("\n".join(unusable))
    return reads


def data_normaliser(cfg: DataConfig) -> Normaliser:
    """How the configured data's records become messages: shape, system prompt and reasoning policy."""
    return Normaliser(None if cfg.shape == "auto" else ShapeSpec.default(cfg.shape), cfg.system_prompt, cfg.reasoning)


def load_dataset(cfg: DataConfig, out_dir: Path) -> LoadedData:
    """Read the configured files, normalise them and write train, validation, eval (test) and quarantine JSONL
    under `out_dir`."""
    fingerprint = data_fingerprint(cfg)
    normaliser = data_normaliser(cfg)
    reads = [read_sources(sources, normaliser) for sources in data_sources(cfg)]
    train, validation, test = ([example for read in split for example in read.examples] for split in reads)
    if cfg.eval is None or cfg.validation is None:
        taken = split_examples(train, cfg)
        train, validation, test = taken["train"], validation + taken["validation"], test + taken["test"]
    rejections = [rejection for split in reads for read in split for rejection in read.rejections]

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "validation", "eval", "quarantine")}
    for name, rows in (("train", train), ("validation", validation), ("eval", test), ("quarantine", rejections)):
        write_jsonl(paths[name], rows)
    return LoadedData(
        train_path=paths["train"],
        validation_path=paths["validation"],
        eval_path=paths["eval"],
        quarantine_path=paths["quarantine"],
        n_train=len(train),
        n_validation=len(validation),
        n_eval=len(test),
        n_rejected=len(rejections),
        fingerprint=fingerprint,
        files=[read.count for split in reads for read in split],
    )


@task(name="load_data", cache_policy=STAGE_CACHE, persist_result=True)
def load_data(cfg: DataConfig, fingerprint: str, workdir: Path) -> LoadedData:
    # `fingerprint` is in the signature so the cache key changes with the files' bytes, not just their paths.
    return load_dataset(cfg, stage_dir(workdir, "load_data", fingerprint))
