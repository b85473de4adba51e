"""The RAG logs as configured (`rag.sql_url` table, `rag.jsonl_dir` drops): the rows beyond the watermark,
with where each came from.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunepipe.tasks.data.files import Rejection
from tunepipe.tasks.runtime.config import RagConfig


class RagSourceError(ValueError):
    """The RAG source cannot be read as configured (missing table or column, a drop file that shrank...)."""


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


def jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return {"$" + type(value).__name__: value.isoformat()}
    if isinstance(value, Decimal):
        return float(value)
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, text),) = value.items()
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
    if (
        url.get_backend_name() == "sqlite"
        and url.database not in (None, "", ":memory:")
        and not Path(url.database).is_file()
    ):
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
        raise RagSourceError(
            f"{problems} in table {rag.table!r} (columns: {', '.join(table.c.keys())}); "
            "map the right names under rag.columns, or null for an optional field"
        )
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
        query = query.where(
            id_col > last[0]
            if rag.watermark_on == "id"
            else or_(order[0] > last[0], and_(order[0] == last[0], id_col > last[1]))
        )
    try:
        with engine.connect() as connection:
            for row in connection.execute(query):
                values = row._asdict()
                key = [values["id"]] if rag.watermark_on == "id" else [values["created_at"], values["id"]]
                yield (
                    RagRow(source=f"sql:{rag.table}", ref=str(values["id"]), values=values),
                    [jsonable(v) for v in key],
                )
    finally:
        engine.dispose()


def read_jsonl_drops(
    rag: RagConfig, consumed: dict[str, list[int]]
) -> tuple[list[RagRow], list[Rejection], dict[str, list[int]]]:
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
            raise RagSourceError(
                f"{path}: {size} bytes, but {done_bytes} were already consumed; drop files may "
                "only grow (write a new file instead of rewriting one)"
            )
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
