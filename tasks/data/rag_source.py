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
from decimal import Decimal
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.data.examples import Message
from tasks.data.load import (
    DataFileError,
    FileRead,
    RecordError,
    Rejection,
    data_fingerprint,
    data_normaliser,
    data_sources,
    example_id,
    held_out_files,
    parse_record,
    prompt_unit,
    read_sources,
    split_band,
)
from tasks.runtime.config import DataConfig, PipelineConfig, RagConfig
from tasks.runtime.records import DatasetRecord, Record

STATE_FILE = "state.json"


class RagSourceError(ValueError):
    """The RAG source cannot be read as configured (missing table or column, a drop file that shrank...)."""


class ConcurrentIngestion(RuntimeError):
    """Another run committed a snapshot between this run's collect and commit; this run's rows are not used."""


class RagRow(BaseModel):
    """One logged example as read from its source, before validation and selection."""

    source: str  # "sql:<table>" or "jsonl:<file name>"
    ref: str  # the row's id (SQL) or "<file>:<line>" (JSONL): where to find it again
    line: int = 0  # 1-based line of a JSONL drop; 0 for a table row
    values: dict[str, Any]  # field name (as in RagColumns) -> raw value


class Watermark(BaseModel):
    """How far each source has been consumed."""

    sql_key: list[Any] | None = None  # JSON form of the last consumed row's (watermark value, id)
    jsonl: dict[str, list[int]] = {}  # drop file name -> [bytes consumed, lines consumed]


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
            datasets=[DatasetRecord(name=f"rag-v{self.version}", digest=self.fingerprint, path=self.data.train,
                                    context="training", profile={  # the full fingerprint is in the profile
                                        "num_rows": sum(self.rows_by_source.values()),
                                        "rows_by_source": self.rows_by_source, "fingerprint": self.fingerprint})],
            tags={f"dataset.rows.{source}": str(rows) for source, rows in self.rows_by_source.items()},
            files=[(self.folder / "manifest.json", "dataset"), (self.folder / "rag.jsonl", "dataset")],
        )


# --- reading the sources -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return {"$" + type(value).__name__: value.isoformat()}
    if isinstance(value, Decimal):
        return float(value)
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (kind, text), = value.items()
        if kind == "$datetime":
            return dt.datetime.fromisoformat(text)
        if kind == "$date":
            return dt.date.fromisoformat(text)
    return value


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _sql_table(rag: RagConfig):
    from sqlalchemy import MetaData, Table, create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchTableError

    url = make_url(rag.sql_url)
    # SQLite creates a missing file on connect: a typo in the path must not look like an empty table.
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).is_file():
            raise RagSourceError(f"rag.sql_url: no SQLite database at {url.database}")
    engine = create_engine(url)
    try:
        table = Table(rag.table, MetaData(), autoload_with=engine)
    except NoSuchTableError:
        engine.dispose()
        raise RagSourceError(f"rag.table: no table {rag.table!r} in {_shown_url(rag.sql_url)}") from None
    mapped = {field: name for field, name in rag.columns.model_dump().items() if name is not None}
    missing = {field: name for field, name in mapped.items() if name not in table.c}
    if missing:
        engine.dispose()
        problems = ", ".join(f"rag.columns.{field}: no column {name!r}" for field, name in missing.items())
        raise RagSourceError(f"{problems} in table {rag.table!r} (columns: {', '.join(table.c.keys())}); "
                             "map the right names under rag.columns, or null for an optional field")
    return engine, table, mapped


def read_sql_rows(rag: RagConfig, after: list[Any] | None) -> Iterator[tuple[RagRow, list[Any]]]:
    """Rows beyond `after` in watermark order, each with its own watermark key (JSON form)."""
    from sqlalchemy import and_, or_, select

    engine, table, mapped = _sql_table(rag)
    id_col = table.c[mapped["id"]]
    order = [id_col] if rag.watermark_on == "id" else [table.c[mapped["created_at"]], id_col]
    query = select(*(table.c[name].label(field) for field, name in mapped.items())).order_by(*order)
    if after is not None:
        last = [_from_jsonable(v) for v in after]
        query = query.where(id_col > last[0] if rag.watermark_on == "id" else
                            or_(order[0] > last[0], and_(order[0] == last[0], id_col > last[1])))
    try:
        with engine.connect() as connection:
            for row in connection.execute(query):
                values = row._asdict()
                key = [values["id"]] if rag.watermark_on == "id" else [values["created_at"], values["id"]]
                yield (RagRow(source=f"sql:{rag.table}", ref=str(values["id"]), values=values),
                       [_jsonable(v) for v in key])
    finally:
        engine.dispose()


def read_jsonl_drops(rag: RagConfig, consumed: dict[str, list[int]]) -> tuple[list[RagRow], list[Rejection],
                                                                               dict[str, list[int]]]:
    """Complete lines past each drop file's consumed bytes; returns rows, unparsable lines, new positions."""
    folder = rag.jsonl_dir
    if not folder.is_dir():
        raise RagSourceError(f"rag.jsonl_dir: not a folder: {folder}")
    rows: list[RagRow] = []
    rejections: list[Rejection] = []
    positions = dict(consumed)
    fields = {field: name for field, name in rag.columns.model_dump().items() if name is not None}
    for path in sorted(folder.glob("*.jsonl")):
        done_bytes, done_lines = consumed.get(path.name, [0, 0])
        size = path.stat().st_size
        if size < done_bytes:
            raise RagSourceError(f"{path}: {size} bytes, but {done_bytes} were already consumed; drop files may "
                                 "only grow (write a new file instead of rewriting one)")
        with path.open("rb") as data:
            data.seek(done_bytes)
            chunk = data.read(size - done_bytes)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next run
        lines = complete.split(b"\n")[:-1]
        for number, raw_bytes in enumerate(lines, start=done_lines + 1):
            raw = raw_bytes.decode("utf-8", "backslashreplace")
            if not raw.strip():
                continue
            ref = f"{path.name}:{number}"
            try:
                record = json.loads(raw_bytes)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                rejections.append(Rejection(source=str(path), line=number, field="<line>", reason=str(exc), raw=raw))
                continue
            values = {field: record.get(name) for field, name in fields.items()}
            rows.append(RagRow(source=f"jsonl:{path.name}", ref=ref, line=number, values=values))
        if complete:
            positions[path.name] = [done_bytes + len(complete), done_lines + len(lines)]
    return rows, rejections, positions


# --- selection ---------------------------------------------------------------------------------------------


def _text_field(values: dict[str, Any], field: str, required: bool) -> str | None:
    value = values.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(field, "missing or empty")
        return None
    if isinstance(value, list) and field == "context" and all(isinstance(p, str) for p in value):
        return "\n\n".join(value)  # retrieved passages logged as a list
    if isinstance(value, dict | list) and field == "answer":
        return json.dumps(value, ensure_ascii=False)  # a JSON column holding the structured answer
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {type(value).__name__}")
    return value


def parse_rating(value: Any, feedback_values: dict[str, float]) -> float | None:
    """A number, a boolean, a numeric string or a feedback word as a rating; None when unrated."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str):
        words = {word.casefold(): rating for word, rating in feedback_values.items()}
        if value.strip().casefold() in words:
            return words[value.strip().casefold()]
        try:
            return float(value)
        except ValueError:
            pass
        raise RecordError("rating", f"{value!r} is neither a number nor one of rag.feedback_values "
                                    f"({', '.join(feedback_values)})")
    raise RecordError("rating", f"must be a number, boolean or feedback word, got {type(value).__name__}")


def rag_messages(question: str, context: str | None, answer: str, rag: RagConfig,
                 system_prompt: str | None) -> list[Message]:
    """The training conversation for one logged example, with the context placed as `rag.context_mode` says."""
    user = question
    system = system_prompt
    if context and rag.context_mode != "omit":
        block = rag.context_template.replace("{context}", context)
        if rag.context_mode == "user":
            user = f"{block}\n\n{question}"
        else:
            system = f"{system_prompt}\n\n{block}" if system_prompt else block
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return parse_record({"messages": messages}, system_prompt=system_prompt)


def _seen_keys(data: DataConfig, rag: RagConfig, snapshot_rag: Path | None) -> tuple[set[str], set[str]]:
    """Dedupe keys of the base set (train, validation and test: a held-out question must never be trained on)
    and of every example ingested before; and those of the base's held-out sets alone."""
    if rag.dedupe == "off":
        return set(), set()
    train, validation, test = _read_base(data)
    eval_keys = {_dedupe_key(example.messages[-2].content, example.messages, rag)
                 for read in validation + test for example in read.examples}
    keys = eval_keys | {_dedupe_key(example.messages[-2].content, example.messages, rag)
                        for read in train for example in read.examples}
    if snapshot_rag is not None:
        with snapshot_rag.open(encoding="utf-8") as lines:
            keys |= {json.loads(line)["rag"]["key"] for line in lines}
    return keys, eval_keys


def _read_base(data: DataConfig) -> tuple[list[FileRead], list[FileRead], list[FileRead]]:
    """The base train, validation and test sets read as the finetune flow reads them: any container,
    normalised."""
    normaliser = data_normaliser(data)
    train, validation, test = (read_sources(sources, normaliser) for sources in data_sources(data))
    return train, validation, test


def _base_lines(reads: list[FileRead]) -> list[dict[str, Any]]:
    """Snapshot lines of the base set: normalised messages, and the file and line or row each came from."""
    return [{"messages": [m.model_dump() for m in example.messages],
             "base": {"source": example.source, "line": example.line, "unit": example.unit}}
            for read in reads for example in read.examples]


def _dedupe_key(question: str, messages: list[Message], rag: RagConfig) -> str:
    """The whole conversation's id, or the question as asked (whatever context was placed around it)."""
    return example_id(messages) if rag.dedupe == "conversation" else " ".join(question.split()).casefold()


class Selected(BaseModel):
    accepted: list[dict[str, Any]]  # {"messages": [...], "rag": {...provenance}} lines of rag.jsonl
    skipped: list[dict[str, Any]]  # {"source", "ref", "reason"}
    rejections: list[Rejection]


def _preference_label(rating: float | None, rag: RagConfig) -> bool | None:
    """True: a desirable answer, False: an undesirable one, None: not a preference row."""
    if rag.max_bad_rating is None or rating is None:
        return None
    if rating <= rag.max_bad_rating:
        return False
    return True if rag.min_rating is None or rating >= rag.min_rating else None


def select_rows(rows: list[RagRow], rag: RagConfig, data: DataConfig, seen: set[str],
                eval_keys: set[str] = frozenset()) -> Selected:
    """Validate each row, apply the rating rules and dedupe; every row ends accepted, skipped or rejected."""
    accepted, skipped, rejections = [], [], []
    for row in rows:
        try:
            question = _text_field(row.values, "question", required=True)
            answer = _text_field(row.values, "answer", required=True)
            context = _text_field(row.values, "context", required=False)
            rating = parse_rating(row.values.get("rating"), rag.feedback_values)
            messages = rag_messages(question, context, answer, rag, data.system_prompt)
        except RecordError as exc:
            rejections.append(Rejection(
                source=row.source, line=row.line, field=exc.field,
                reason=f"row {row.ref}: {exc.message}",
                raw=json.dumps(row.values, default=str, ensure_ascii=False),
            ))
            continue
        reason = None
        label = _preference_label(rating, rag)
        if rating is None and not rag.keep_unrated:
            reason = "unrated"
        elif label is None and rating is not None and rag.min_rating is not None and rating < rag.min_rating:
            reason = ("rating between max_bad_rating and min_rating" if rag.max_bad_rating is not None
                      else "rating below min_rating")
        key = _dedupe_key(question, messages, rag)
        if label is False:
            # Each distinct bad answer once; never one to a held-out question (that would train on it).
            if key in eval_keys:
                reason = reason or "question in the base validation or test set"
            key = f"{key}\x00bad\x00{' '.join(answer.split())}"
        if reason is None and rag.dedupe != "off" and key in seen:
            reason = f"duplicate {rag.dedupe}"
        if reason is not None:
            skipped.append({"source": row.source, "ref": row.ref, "reason": reason})
            continue
        seen.add(key)
        created_at = row.values.get("created_at")
        turns = [m.model_dump() for m in messages]
        # A rated row in TRL's unpaired format (KTO); SFT rows stay `messages` rows as before.
        example = ({"messages": turns} if label is None else
                   {"prompt": turns[:-1], "completion": turns[-1:], "label": label})
        accepted.append({
            **example,
            "rag": {"source": row.source, "ref": row.ref, "id": _jsonable(row.values.get("id")), "key": key,
                    "rating": rating, "created_at": str(created_at) if created_at is not None else None},
        })
    return Selected(accepted=accepted, skipped=skipped, rejections=rejections)


# --- state, collect, commit --------------------------------------------------------------------------------


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
    selected = select_rows(rows, rag, data, *_seen_keys(data, rag, previous))
    staging = folder / "staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    _write_lines(staging / "new.jsonl", selected.accepted)
    _write_lines(staging / "skipped.jsonl", selected.skipped)
    _write_lines(staging / "quarantine.jsonl", [r.model_dump() for r in rejections + selected.rejections])
    return Collected(
        state_dir=folder, based_on=state, watermark=watermark, staging=staging, n_read=len(rows),
        n_new=len(selected.accepted), n_rejected=len(rejections) + len(selected.rejections),
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
        raise ConcurrentIngestion(f"{folder / STATE_FILE} changed since this run read the sources (another "
                                  "retrain run committed first); nothing of this run was committed")
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
    base_train, base_validation, base_test = _read_base(data)
    base_rejected = [r for read in base_train + base_validation + base_test for r in read.rejections]
    if base_rejected and data.on_invalid == "fail":
        raise DataFileError(f"{base_rejected[0].message} (data.on_invalid: fail)")
    train_lines = _base_lines(base_train)
    rag_lines = [json.loads(line) for line in (building / "rag.jsonl").open(encoding="utf-8")]
    sides = [_held_out_side(line, data) for line in rag_lines]
    held = [line for line, side in zip(rag_lines, sides) if side != "train"]
    kept = [line for line, side in zip(rag_lines, sides) if side == "train"]
    pairs = preference_pairs(train_lines, kept)
    _write_lines(building / "train.jsonl", train_lines + kept + pairs)
    for split, name, base_reads in (("validation", "validation", base_validation), ("test", "eval", base_test)):
        if held_out_files(data, split) is not None:
            _write_lines(building / f"{name}.jsonl", _base_lines(base_reads)
                         + [line for line, side in zip(rag_lines, sides) if side == split])
    shutil.copyfile(collected.staging / "skipped.jsonl", building / "skipped.jsonl")
    # Base rows that cannot be used are set aside here, never dropped: the finetune run sees only the snapshot.
    with (building / "quarantine.jsonl").open("w", encoding="utf-8") as out:
        out.write((collected.staging / "quarantine.jsonl").read_text(encoding="utf-8"))
        out.writelines(r.model_dump_json() + "\n" for r in base_rejected)

    rag_counts = _count_by_source(building / "rag.jsonl")
    new_counts = _count_by_source(collected.staging / "new.jsonl")
    manifest = {
        "version": version, "committed_at": dt.datetime.now(dt.UTC).isoformat(),
        "base_train": str(data.train), "base_eval": str(data.eval) if data.eval is not None else None,
        "base_validation": str(data.validation) if data.validation is not None else None,
        "rows_by_source": {"base": len(train_lines), **rag_counts}, "new_by_source": dict(new_counts),
        "skipped": collected.skipped, "rejected": collected.n_rejected, "base_rejected": len(base_rejected),
        "preference": {"desirable": sum(line.get("label") is True for line in rag_lines),
                       "undesirable": sum(line.get("label") is False for line in rag_lines),
                       "pairs": len(pairs), "held_out": len(held)},
        "watermark": collected.watermark.model_dump(mode="json"),
    }
    (building / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if target.exists():  # left by a run that died before moving the watermark: never committed
        shutil.rmtree(target)
    os.replace(building, target)
    # The commit point: from here on these rows belong to snapshot `version` and are never read again.
    _write_atomically(folder / STATE_FILE, RagState(
        watermark=collected.watermark, version=version, n_rag=sum(rag_counts.values()),
        n_rag_trained=base.n_rag_trained,
    ).model_dump_json(indent=2))
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
            pairs.append({"prompt": line["prompt"], "chosen": [good[0]], "rejected": line["completion"],
                          "rag": {"source": line["rag"]["source"], "ref": line["rag"]["ref"],
                                  "version": line["rag"].get("version"), "chosen": good[1]}})
    return pairs


def _prompt_id(turns: list[dict[str, Any]]) -> str:
    return example_id(parse_record({"messages": turns}))


def load_snapshot(folder: Path, version: int, data: DataConfig) -> Snapshot:
    """A committed snapshot, with the pipeline's data section pointed at its merged training file."""
    target = snapshot_folder(folder, version)
    manifest = json.loads((target / "manifest.json").read_text())
    # Normalised already: `messages` rows (TRL's preference rows beside them, detected by their keys), one file
    # each for train, validation and test (no LLaMA-Factory selection left).
    merged = data.model_copy(update={
        "train": target / "train.jsonl", "shape": "openai" if not _has_preference(target) else "auto",
        "datasets": [],
        "eval": target / "eval.jsonl" if (target / "eval.jsonl").is_file() else None,
        "validation": target / "validation.jsonl" if (target / "validation.jsonl").is_file() else None,
    })
    return Snapshot(version=version, folder=target, data=merged, fingerprint=data_fingerprint(merged),
                    rows_by_source=manifest["rows_by_source"], new_by_source=manifest["new_by_source"])


def _has_preference(target: Path) -> bool:
    manifest = json.loads((target / "manifest.json").read_text())
    return any(manifest.get("preference", {}).values())


def mark_trained(folder: Path, snapshot: Snapshot) -> None:
    """Record that a finetune run finished on `snapshot`: its examples no longer count as pending."""
    state = read_state(folder)
    n_rag = sum(n for source, n in snapshot.rows_by_source.items() if source != "base")
    if n_rag > state.n_rag_trained:
        _write_atomically(folder / STATE_FILE, state.model_copy(update={"n_rag_trained": n_rag})
                          .model_dump_json(indent=2))


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

