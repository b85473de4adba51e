"""Accumulated RAG examples: read what arrived since the watermark, select, and commit a dataset snapshot.

Exactly-once ingestion rests on one file, `<state_dir>/state.json`: the committed watermark (the last SQL
row and the bytes of each JSONL drop consumed) and the current snapshot. `collect_new_rows` reads only rows
beyond the watermark and records how far it read; `commit_snapshot` writes a new snapshot folder (the base set,
read from any container `data.train`/`data.eval` take and normalised to `messages`, plus every example ingested
so far) and only then replaces `state.json`, in one atomic rename. A run that dies before the rename leaves the
old state, so the same rows are read again; rows that arrive while a run is in progress lie beyond the point it
recorded, so the next run reads them. A snapshot whose training did not finish stays "untrained" and counts
towards the next run's `min_new_examples`, so a failed run loses nothing either.

Preference rows (`rag.max_bad_rating` set): rated rows become KTO rows in TRL's format
(`prompt`/`completion`/`label`: desirable at or above `min_rating`, undesirable at or below `max_bad_rating`),
and each snapshot pairs every rated-bad answer with a good answer to the same prompt (a rated-good RAG answer,
else the base set's) as a DPO row (`prompt`/`chosen`/`rejected`). Rated questions are held out by prompt
(the split bands of `data.eval_fraction` and `data.validation_fraction`) into the test and validation files when
those are given, so evaluation has rated-bad answers it never trained on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tunepipe.tasks.data.containers import DataFileError
from tunepipe.tasks.data.files import Rejection
from tunepipe.tasks.data.load import data_fingerprint, held_out_files, prompt_unit, split_band
from tunepipe.tasks.data.rag_logs import RagRow, RagSourceError, Watermark, read_jsonl_drops, read_sql_rows
from tunepipe.tasks.data.rag_selection import base_lines, read_base, seen_keys, select_rows
from tunepipe.tasks.data.shapes import example_id, parse_record
from tunepipe.tasks.runtime.config import DataConfig, PipelineConfig, RagConfig
from tunepipe.tasks.runtime.records import DatasetRecord, Record

STATE_FILE = "state.json"


class ConcurrentIngestion(RuntimeError):
    """Another run committed a snapshot between this run's collect and commit; this run's rows are not used."""


class RagState(BaseModel):
    watermark: Watermark = Watermark()
    version: int = 0  # the committed snapshot, snapshots/v0001 ...; 0: none yet
    n_rag: int = 0  # RAG examples in that snapshot
    n_rag_trained: int = 0  # RAG examples in the last snapshot a finetune run finished on


class Collected(BaseModel):
    """Rows read beyond the watermark, already selected, staged on disk until they are committed."""

    state_dir: Path
    based_on: RagState  # the state this batch was read against; commit refuses if it changed
    watermark: Watermark  # where the watermark moves when this batch is committed
    staging: Path  # new.jsonl (accepted), skipped.jsonl (filtered, with reason), quarantine.jsonl
    n_read: int
    n_new: int
    n_rejected: int
    skipped: dict[str, int]  # reason -> rows

    @property
    def n_untrained(self) -> int:
        return self.based_on.n_rag - self.based_on.n_rag_trained

    @property
    def n_pending(self) -> int:
        """Examples no finished training run has seen: new rows plus a committed snapshot not trained on."""
        return self.n_new + self.n_untrained


class Snapshot(BaseModel):
    """One committed version of the merged dataset: what the finetune flow trains on."""

    version: int
    folder: Path
    data: DataConfig  # the pipeline's data section with `train` pointing at the merged file
    fingerprint: str  # equals the finetune run's `dataset.fingerprint`
    rows_by_source: dict[str, int]  # "base" and each RAG source -> rows in the merged training file
    new_by_source: dict[str, int]  # what this version added

    def record(self) -> Record:
        """The versioned training set as the run's input (MLflow's dataset tracking), with its files."""
        return Record(
            datasets=[
                DatasetRecord(
                    name=f"rag-v{self.version}",
                    digest=self.fingerprint,
                    path=self.data.train,
                    context="training",
                    profile={  # the full fingerprint is in the profile
                        "num_rows": sum(self.rows_by_source.values()),
                        "rows_by_source": self.rows_by_source,
                        "fingerprint": self.fingerprint,
                    },
                )
            ],
            tags={f"dataset.rows.{source}": str(rows) for source, rows in self.rows_by_source.items()},
            files=[(self.folder / "manifest.json", "dataset"), (self.folder / "rag.jsonl", "dataset")],
        )


def state_dir(cfg: PipelineConfig) -> Path:
    return cfg.rag.state_dir if cfg.rag.state_dir is not None else cfg.workdir / "rag"


@contextmanager
def retrain_lock(folder: Path, logger: logging.Logger) -> Iterator[None]:
    """Hold `<folder>/retrain.lock` for a whole retrain run: one run per RAG state at a time.

    Two triggers at once (a schedule and a manual run, a scheduler firing twice) would read the same rows;
    the second waits here instead, and then reads only what the first left. The lock is the operating
    system's (flock): a run that dies releases it with its process.
    """
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / "retrain.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another retrain run holds %s: waiting until it ends", lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def read_state(folder: Path) -> RagState:
    path = folder / STATE_FILE
    return RagState.model_validate_json(path.read_text()) if path.exists() else RagState()


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with temporary.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)  # atomic: readers see the old state or the new one, never half


def snapshot_folder(folder: Path, version: int) -> Path:
    return folder / "snapshots" / f"v{version:04d}"


def collect_new_rows(rag: RagConfig, data: DataConfig, folder: Path) -> Collected:
    """Read every row beyond the committed watermark, select, and stage the result under `folder/staging`."""
    if rag.sql_url is None and rag.jsonl_dir is None:
        raise RagSourceError("rag: set sql_url, jsonl_dir or both")
    state = read_state(folder)
    rows: list[RagRow] = []
    watermark = state.watermark.model_copy()
    if rag.sql_url is not None:
        for row, key in read_sql_rows(rag, state.watermark.sql_key):
            rows.append(row)
            watermark.sql_key = key
    rejections: list[Rejection] = []
    if rag.jsonl_dir is not None:
        drop_rows, rejections, watermark.jsonl = read_jsonl_drops(rag, state.watermark.jsonl)
        rows += drop_rows

    previous = snapshot_folder(folder, state.version) / "rag.jsonl" if state.version else None
    selected = select_rows(rows, rag, data, *seen_keys(data, rag, previous))
    staging = folder / "staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    _write_lines(staging / "new.jsonl", selected.accepted)
    _write_lines(staging / "skipped.jsonl", selected.skipped)
    _write_lines(staging / "quarantine.jsonl", [r.model_dump() for r in rejections + selected.rejections])
    return Collected(
        state_dir=folder,
        based_on=state,
        watermark=watermark,
        staging=staging,
        n_read=len(rows),
        n_new=len(selected.accepted),
        n_rejected=len(rejections) + len(selected.rejections),
        skipped=dict(Counter(s["reason"] for s in selected.skipped)),
    )


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _count_by_source(rag_file: Path) -> Counter:
    with rag_file.open(encoding="utf-8") as lines:
        return Counter(json.loads(line)["rag"]["source"] for line in lines)


def commit_snapshot(collected: Collected, data: DataConfig) -> Snapshot:
    """Write snapshot v(N+1) = base set + all ingested examples, then move the watermark to it, atomically."""
    folder = collected.state_dir
    if read_state(folder) != collected.based_on:
        raise ConcurrentIngestion(
            f"{folder / STATE_FILE} changed since this run read the sources (another "
            "retrain run committed first); nothing of this run was committed"
        )
    base = collected.based_on
    version = base.version + 1
    target = snapshot_folder(folder, version)
    building = target.with_name(f".{target.name}-{uuid.uuid4().hex}")
    building.mkdir(parents=True)
    with (building / "rag.jsonl").open("wb") as out:
        # v3's examples are v2's plus the new ones: every snapshot holds everything ingested so far.
        if base.version:
            out.write((snapshot_folder(folder, base.version) / "rag.jsonl").read_bytes())
        for line in (collected.staging / "new.jsonl").open(encoding="utf-8"):
            row = json.loads(line)
            row["rag"]["version"] = version
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    # The base set as loaded and normalised (whatever its containers), so the snapshot is one JSON Lines
    # dataset of `messages`; each line keeps the file and line or row it came from.
    base_train, base_validation, base_test = read_base(data)
    base_rejected = [r for read in base_train + base_validation + base_test for r in read.rejections]
    if base_rejected and data.on_invalid == "fail":
        raise DataFileError(f"{base_rejected[0].message} (data.on_invalid: fail)")
    train_lines = base_lines(base_train)
    rag_lines = [json.loads(line) for line in (building / "rag.jsonl").open(encoding="utf-8")]
    sides = [_held_out_side(line, data) for line in rag_lines]
    held = [line for line, side in zip(rag_lines, sides) if side != "train"]
    kept = [line for line, side in zip(rag_lines, sides) if side == "train"]
    pairs = preference_pairs(train_lines, kept)
    _write_lines(building / "train.jsonl", train_lines + kept + pairs)
    for split, name, base_reads in (("validation", "validation", base_validation), ("test", "eval", base_test)):
        if held_out_files(data, split) is not None:
            _write_lines(
                building / f"{name}.jsonl",
                base_lines(base_reads) + [line for line, side in zip(rag_lines, sides) if side == split],
            )
    shutil.copyfile(collected.staging / "skipped.jsonl", building / "skipped.jsonl")
    # Base rows that cannot be used are set aside here, never dropped: the finetune run sees only the snapshot.
    with (building / "quarantine.jsonl").open("w", encoding="utf-8") as out:
        out.write((collected.staging / "quarantine.jsonl").read_text(encoding="utf-8"))
        out.writelines(r.model_dump_json() + "\n" for r in base_rejected)

    rag_counts = _count_by_source(building / "rag.jsonl")
    new_counts = _count_by_source(collected.staging / "new.jsonl")
    manifest = {
        "version": version,
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
        "base_train": str(data.train),
        "base_eval": str(data.eval) if data.eval is not None else None,
        "base_validation": str(data.validation) if data.validation is not None else None,
        "rows_by_source": {"base": len(train_lines), **rag_counts},
        "new_by_source": dict(new_counts),
        "skipped": collected.skipped,
        "rejected": collected.n_rejected,
        "base_rejected": len(base_rejected),
        "preference": {
            "desirable": sum(line.get("label") is True for line in rag_lines),
            "undesirable": sum(line.get("label") is False for line in rag_lines),
            "pairs": len(pairs),
            "held_out": len(held),
        },
        "watermark": collected.watermark.model_dump(mode="json"),
    }
    (building / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if target.exists():  # left by a run that died before moving the watermark: never committed
        shutil.rmtree(target)
    os.replace(building, target)
    # The commit point: from here on these rows belong to snapshot `version` and are never read again.
    _write_atomically(
        folder / STATE_FILE,
        RagState(
            watermark=collected.watermark,
            version=version,
            n_rag=sum(rag_counts.values()),
            n_rag_trained=base.n_rag_trained,
        ).model_dump_json(indent=2),
    )
    shutil.rmtree(collected.staging, ignore_errors=True)
    return load_snapshot(folder, version, data)


def _held_out_side(line: dict[str, Any], data: DataConfig) -> str:
    """Where a rated RAG row goes when its prompt's band (`load.split_band`, as the finetune run splits) is a
    split given as files: that split's file; any other row trains, or is split off by the run itself."""
    if "label" not in line:
        return "train"
    band = split_band(prompt_unit(parse_record({"messages": line["prompt"]})), data)
    return band if band != "train" and held_out_files(data, band) is not None else "train"


def preference_pairs(base_lines: list[dict[str, Any]], rag_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A DPO row for every rated-bad answer whose prompt also has a good one: the first rated-good RAG answer
    to the same prompt, else the base set's answer to it."""
    chosen: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for line in base_lines:
        chosen.setdefault(_prompt_id(line["messages"][:-1]), (line["messages"][-1], {"base": line["base"]}))
    for line in rag_lines:
        if line.get("label") is True:  # a rated-good RAG answer beats the base set's, being what users liked
            prompt = _prompt_id(line["prompt"])
            if prompt not in chosen or "base" in chosen[prompt][1]:
                chosen[prompt] = (line["completion"][0], {"ref": line["rag"]["ref"], "source": line["rag"]["source"]})
    pairs = []
    for line in rag_lines:
        good = chosen.get(_prompt_id(line["prompt"])) if line.get("label") is False else None
        if good is not None:
            pairs.append(
                {
                    "prompt": line["prompt"],
                    "chosen": [good[0]],
                    "rejected": line["completion"],
                    "rag": {
                        "source": line["rag"]["source"],
                        "ref": line["rag"]["ref"],
                        "version": line["rag"].get("version"),
                        "chosen": good[1],
                    },
                }
            )
    return pairs


def _prompt_id(turns: list[dict[str, Any]]) -> str:
    return example_id(parse_record({"messages": turns}))


def load_snapshot(folder: Path, version: int, data: DataConfig) -> Snapshot:
    """A committed snapshot, with the pipeline's data section pointed at its merged training file."""
    target = snapshot_folder(folder, version)
    manifest = json.loads((target / "manifest.json").read_text())
    # Normalised already: `messages` rows (TRL's preference rows beside them, detected by their keys), one file
    # each for train, validation and test (no LLaMA-Factory selection left).
    merged = data.model_copy(
        update={
            "train": target / "train.jsonl",
            "shape": "openai" if not _has_preference(target) else "auto",
            "datasets": [],
            "eval": target / "eval.jsonl" if (target / "eval.jsonl").is_file() else None,
            "validation": target / "validation.jsonl" if (target / "validation.jsonl").is_file() else None,
        }
    )
    return Snapshot(
        version=version,
        folder=target,
        data=merged,
        fingerprint=data_fingerprint(merged),
        rows_by_source=manifest["rows_by_source"],
        new_by_source=manifest["new_by_source"],
    )


def _has_preference(target: Path) -> bool:
    manifest = json.loads((target / "manifest.json").read_text())
    return any(manifest.get("preference", {}).values())


def mark_trained(folder: Path, snapshot: Snapshot) -> None:
    """Record that a finetune run finished on `snapshot`: its examples no longer count as pending."""
    state = read_state(folder)
    n_rag = sum(n for source, n in snapshot.rows_by_source.items() if source != "base")
    if n_rag > state.n_rag_trained:
        _write_atomically(
            folder / STATE_FILE, state.model_copy(update={"n_rag_trained": n_rag}).model_dump_json(indent=2)
        )


def discard(collected: Collected) -> None:
    shutil.rmtree(collected.staging, ignore_errors=True)


def count_new_rows(rag: RagConfig, folder: Path) -> int:
    """Rows beyond the committed watermark (before selection), for `tunepipe status`."""
    state = read_state(folder)
    n = 0
    if rag.sql_url is not None:
        n += sum(1 for _ in read_sql_rows(rag, state.watermark.sql_key))
    if rag.jsonl_dir is not None:
        rows, rejections, _ = read_jsonl_drops(rag, state.watermark.jsonl)
        n += len(rows) + len(rejections)
    return n


@task(name="collect_rag_examples", cache_policy=NO_CACHE)
def collect_rag_examples(cfg: PipelineConfig) -> Collected:
    # Never cached: what it returns depends on the sources and the watermark, not on its arguments.
    return collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))


@task(name="commit_rag_snapshot", cache_policy=NO_CACHE)
def commit_rag_snapshot(collected: Collected, cfg: PipelineConfig) -> Snapshot:
    return commit_snapshot(collected, cfg.data)
