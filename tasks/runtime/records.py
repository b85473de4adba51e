"""What a run keeps of a result, as data: each stage's result type returns a `Record` from its `record()`.

Plain pydantic, no MLflow: the training worker imports result types and never pays for MLflow's import.
The writer (tasks/runtime/tracking.py) turns records into MLflow params, metrics, tags and artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel


class MlflowRunRef(BaseModel):
    """Where a stage may report live progress: the flow's MLflow run."""

    tracking_uri: str
    run_id: str


class Point(BaseModel):
    """One value of a per-step metric (a loss curve)."""

    name: str
    value: float
    step: int


class DatasetRecord(BaseModel):
    """An MLflow dataset input: a local file with its digest (MLflow keeps 36 characters: we give 16) and a profile."""

    name: str  # after the pipeline's name: `<pipeline>-<name>`
    digest: str
    path: Path
    context: str  # training or evaluation
    profile: dict[str, Any]


class Record(BaseModel):
    """What a run keeps of one result. `a + b` records both."""

    params: dict[str, str] = {}
    metrics: dict[str, float | None] = {}  # at step 0; None is left out
    points: list[Point] = []  # per-step values, logged as given
    # Per-step values a stage also logs live while it runs: logged only for the names the run has none of,
    # so a cached stage's curve still reaches the run and a stage that ran is not logged twice.
    backfill: list[Point] = []
    tags: dict[str, str] = {}
    texts: dict[str, str] = {}  # artifact file -> its text
    files: list[tuple[Path, str]] = []  # a local file or folder -> the artifact folder it goes in
    tables: dict[str, dict[str, list]] = {}  # artifact file -> columns (MLflow's table view)
    datasets: list[DatasetRecord] = []
    gate_failed: bool | None = None  # the run ends FAILED even without an error (the gate said no)

    def __add__(self, other: Record) -> Record:
        merged = {}
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, dict):
                merged[name] = {**mine, **theirs}
            elif isinstance(mine, list):
                merged[name] = mine + theirs
            else:
                merged[name] = mine if theirs is None else theirs
        return Record(**merged)


class Recorded(Protocol):
    def record(self) -> Record: ...


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"max_steps": 20}} -> {"train.max_steps": "20"}: MLflow params are flat strings."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)}
