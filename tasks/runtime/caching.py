"""Cache keys for expensive stages: a content hash of what a stage reads, valid only while its outputs exist.

Prefect's default policy includes the flow run id and so never hits across runs; and a cache hit does not
notice that the folder a result points at was deleted (see shared/notes/prefect-caching.md). `StageCache`
fixes both: the key hashes the task's inputs (fingerprints, config sections, paths), its module's source, its
result type's module's and the source of the modules that do its work in a worker process, and a record
whose files are gone is passed over, so the stage runs again and writes them back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel


def stable_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_jsonable(p) for p in parts], sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file (as Ollama names blobs), hashed in chunks."""
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def stage_dir(workdir: Path, stage: str, *inputs: Any) -> Path:
    """Where a stage writes: one folder per distinct input, so re-running it rewrites the same place."""
    return Path(workdir) / stage / stable_hash(*inputs)[:16]


def outputs_exist(value: Any) -> bool:
    """True when every path inside a stage result (a pydantic model, possibly nested) still exists."""
    if isinstance(value, Path):
        return value.exists()
    if isinstance(value, BaseModel):
        return all(outputs_exist(getattr(value, name)) for name in type(value).model_fields)
    if isinstance(value, dict):
        return all(outputs_exist(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(outputs_exist(item) for item in value)
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        # A section may name fields that decide nothing a stage writes (`cache_exclude`): they stay out of keys.
        return value.model_dump(mode="json", exclude=getattr(value, "cache_exclude", None))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


@dataclass
class StageCache(CachePolicy):
    # Arguments that do not change what the stage produces (e.g. where to report live metrics).
    ignore: tuple[str, ...] = ()
    # Modules whose code decides the result besides the task's own (a worker's entry point): editing one
    # must miss the cache just as editing the task's module does.
    sources: tuple[str, ...] = ()
    # Arguments (pydantic models) of which only some fields decide the result: {argument: those fields}.
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        inputs = {
            name: value.model_dump(mode="json", include=set(self.fields[name])) if name in self.fields else value
            for name, value in inputs.items()
            if name not in self.ignore
        }
        # The task's module, its result type's (a result of the type's old shape must not come back), and
        # `sources`.
        returned = inspect.signature(task_ctx.task.fn, eval_str=True).return_annotation
        paths = [
            inspect.getsourcefile(task_ctx.task.fn),
            *(
                [inspect.getsourcefile(returned)]
                if isinstance(returned, type) and issubclass(returned, BaseModel)
                else []
            ),
            *(importlib.util.find_spec(m).origin for m in self.sources),
        ]
        code = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]
        key = stable_hash(task_ctx.task.name, code, inputs)
        store = task_ctx.result_store
        # Walk key, key-rerun-1, ... to the newest record: a hit when the files it names all exist, else the empty
        # slot after it (a re-run). Every slot names the same stage folder, and a re-run rewrites an older
        # record's files too: only the newest record describes the files there now.
        newest = None
        for attempt in count():
            candidate = key if attempt == 0 else f"{key}-rerun-{attempt}"
            if not store.exists(candidate):
                return newest if newest and outputs_exist(store.read(newest).result) else candidate
            newest = candidate


STAGE_CACHE = StageCache()
