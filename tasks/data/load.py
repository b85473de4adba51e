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
A JSON object or array answer is written compactly with its key order kept. Preference rows (issue 22) are
examples too: KTO rows carry `label` (desirable or not), DPO rows `rejected` (the chosen answer is the final
message); LLaMA-Factory's `kto_tag` column and `ranking: true` datasets (`chosen`/`rejected`) read the same way.

Nothing is dropped silently: a row that cannot be turned into a conversation becomes a `Rejection` naming
the file, the line (JSON Lines) or row (arrays, CSV, Parquet), the field and the problem, with the original
text kept, and goes to a quarantine file. A file that cannot be used at all (not UTF-8, empty, an array of
non-objects, no record of a known shape) raises `DataFileError` naming the file and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.chat.examples import write_jsonl
from tasks.data.containers import DataFileError, DataSource
from tasks.data.files import FileRead, fingerprint_files, read_file, resolve_sources
from tasks.data.results import LoadedData
from tasks.data.shapes import Normaliser, ShapeSpec
from tasks.data.split import split_examples
from tasks.runtime.caching import STAGE_CACHE, stage_dir
from tasks.runtime.config import DataConfig


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
    return Normaliser(None if cfg.shape == "auto" else ShapeSpec.default(cfg.shape), cfg.system_prompt,
                      cfg.reasoning)


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
