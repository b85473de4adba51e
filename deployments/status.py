"""`tunepipe status` and `tunepipe trace`: read what the runs recorded (MLflow runs and registry, the RAG state).

Nothing here writes: both commands are safe to run against a production tracking server at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunepipe.tasks.integrations.model_registry import ChampionRef, find_champion
from tunepipe.tasks.runtime.config import PipelineConfig


class RunLine(BaseModel):
    run_id: str
    name: str
    status: str
    started: str
    gate: str
    ollama: str
    dataset: str


# Never wrapped: an id, a run's name, a date, a fingerprint.
WHOLE = ("run_id", "name", "started", "dataset")


class RagStatus(BaseModel):
    state_dir: Path
    snapshot_version: int
    examples_ingested: int
    examples_untrained: int
    watermark: dict[str, Any]
    new_rows: int | None
    error: str | None


class Status(BaseModel):
    champion: ChampionRef | None
    last_runs: list[RunLine]
    pending_registrations: list[RunLine]  # gate passed, exported, but not registered in Ollama
    rag: RagStatus | None


class Trace(BaseModel):
    tag: str
    version: str
    run_id: str
    run_name: str
    run_status: str
    dataset_fingerprint: str
    datasets: list[dict[str, Any]]  # the run's MLflow dataset inputs: name, digest, rows by source
    train_file: str
    source_rows: list[dict[str, Any]]  # provenance of each RAG example: source, ref, id, created_at, rating


def _client(cfg: PipelineConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


def _run_line(run) -> RunLine:
    import datetime as dt

    tags = run.data.tags
    return RunLine(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        started=dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        gate=tags.get("gate", "-"),
        ollama=tags.get("ollama.state", "-"),
        dataset=tags.get("dataset.fingerprint", "")[:12],
    )


def gather_status(cfg: PipelineConfig, last: int = 5) -> Status:
    from tunepipe.tasks.data.rag_source import count_new_rows, read_state, state_dir

    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs, pending = [], []
    if experiment is not None:
        ids = [experiment.experiment_id]
        # Pipeline runs only: each retrain attempt is a child run of its pipeline run.
        runs = [
            run
            for run in client.search_runs(ids, order_by=["attribute.start_time DESC"], max_results=10 * last)
            if "mlflow.parentRunId" not in run.data.tags
        ][:last]
        pending = client.search_runs(
            ids,
            "tags.gate = 'passed' and tags.`ollama.state` = 'unreachable'",
            order_by=["attribute.start_time DESC"],
            max_results=20,
        )
    rag = None
    if cfg.rag is not None:
        folder = state_dir(cfg)
        state = read_state(folder)
        new_rows, error = None, None
        try:
            new_rows = count_new_rows(cfg.rag, folder)
        except Exception as exc:  # noqa: BLE001  (a source that cannot be read is part of the status)
            error = f"{type(exc).__name__}: {exc}"
        rag = RagStatus(
            state_dir=folder,
            snapshot_version=state.version,
            examples_ingested=state.n_rag,
            examples_untrained=state.n_rag - state.n_rag_trained,
            watermark=state.watermark.model_dump(mode="json"),
            new_rows=new_rows,
            error=error,
        )
    return Status(
        champion=find_champion(cfg.tracking.uri, cfg.name),
        last_runs=[_run_line(r) for r in runs],
        pending_registrations=[_run_line(r) for r in pending],
        rag=rag,
    )


class TraceError(LookupError):
    pass


def find_version(cfg: PipelineConfig, tag: str):
    """The registered version an Ollama tag names: its `ollama.tag` version tag, or the champion for :latest."""
    name, _, label = tag.partition(":")
    if not label:
        raise TraceError(f"{tag!r}: expected an Ollama tag NAME:VERSION, e.g. {cfg.ollama.model_name}:1")
    client = _client(cfg)
    if label == "latest":
        champion = find_champion(cfg.tracking.uri, cfg.name)
        if champion is None:
            raise TraceError(f"{tag}: no champion registered under {cfg.name!r} yet")
        return client.get_model_version(cfg.name, champion.version)
    versions = client.search_model_versions(f"name = '{cfg.name}'")
    matches = [v for v in versions if v.tags.get("ollama.tag") == tag]
    if not matches:
        raise TraceError(f"{tag}: no version of registered model {cfg.name!r} has tag ollama.tag={tag}")
    return matches[0]


def gather_trace(cfg: PipelineConfig, tag: str, rows: int) -> Trace:
    import tempfile

    import mlflow.artifacts

    client = _client(cfg)
    version = find_version(cfg, tag)
    run = client.get_run(version.run_id)
    datasets = [
        {"name": d.dataset.name, "digest": d.dataset.digest, **json.loads(d.dataset.profile or "{}")}
        for d in run.inputs.dataset_inputs
    ]
    source_rows: list[dict[str, Any]] = []
    if rows and any(a.path == "dataset/rag.jsonl" for a in client.list_artifacts(run.info.run_id, "dataset")):
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="dataset/rag.jsonl", dst_path=tmp, tracking_uri=cfg.tracking.uri
            )
            with open(local, encoding="utf-8") as lines:
                for line, _ in zip(lines, range(rows)):
                    example = json.loads(line)
                    provenance = {k: v for k, v in example["rag"].items() if k != "key"}
                    source_rows.append({**provenance, "question": example["messages"][-2]["content"][-200:]})
    return Trace(
        tag=tag,
        version=str(version.version),
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        run_status=run.info.status,
        dataset_fingerprint=run.data.tags.get("dataset.fingerprint", ""),
        datasets=datasets,
        train_file=run.data.params.get("data.train", ""),
        source_rows=source_rows,
    )


def print_status(cfg: PipelineConfig) -> int:
    from rich.console import Console

    show_status(Console(), cfg.name, gather_status(cfg))
    return 0


def show_status(console, name: str, status: Status) -> None:
    """The champion, the last runs, the pending registrations and the RAG state; ids, names and dates whole at
    any terminal width (the run ids are what `tunepipe register` takes)."""
    from rich.markup import escape
    from rich.table import Table

    from tunepipe.deployments.output import print_fitted

    champion = status.champion
    console.print(
        f"champion of {name!r}: "
        + (
            f"v{champion.version} (run {champion.run_id}, Ollama {champion.tags.get('ollama.tag', '?')}, "
            f"dataset {champion.tags.get('dataset.fingerprint', '?')[:12]})"
            if champion
            else "none promoted yet"
        ),
        markup=False,
        soft_wrap=True,
    )
    for title, lines in (
        ("last runs", status.last_runs),
        ("pending registrations (gate passed, not in Ollama)", status.pending_registrations),
    ):
        table = Table(title=title)
        for column in RunLine.model_fields:
            table.add_column(column, no_wrap=column in WHOLE, overflow="fold")
        for line in lines:
            table.add_row(*(escape(str(v)) for v in line.model_dump().values()))
        print_fitted(console, table)
    if status.rag is not None:
        rag = status.rag
        waiting = rag.error or f"{rag.new_rows} new rows beyond the watermark"
        console.print(
            f"RAG ({rag.state_dir}): snapshot v{rag.snapshot_version}, {rag.examples_ingested} examples "
            f"ingested, {rag.examples_untrained} not yet trained on; {waiting}; "
            f"watermark {json.dumps(rag.watermark)}",
            markup=False,
            soft_wrap=True,
        )


def print_trace(cfg: PipelineConfig, tag: str, rows: int) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    try:
        trace = gather_trace(cfg, tag, rows)
    except TraceError as exc:
        console.print(f"[bold red]{escape(str(exc))}[/]", soft_wrap=True)
        return 1
    console.print(
        f"{trace.tag} = {cfg.name} v{trace.version}, MLflow run {trace.run_id} ({trace.run_name}, "
        f"{trace.run_status})\ndataset fingerprint {trace.dataset_fingerprint}\n"
        f"train file {trace.train_file}",
        markup=False,
        soft_wrap=True,
    )
    for dataset in trace.datasets:
        rows = dataset.get("rows_by_source") or dataset.get("rows_by_file", {})  # a RAG snapshot, or a split
        console.print(f"input {dataset['name']} ({dataset['digest']}): {rows}", markup=False, soft_wrap=True)
    for row in trace.source_rows:
        console.print(json.dumps(row, ensure_ascii=False), markup=False, soft_wrap=True)
    return 0
