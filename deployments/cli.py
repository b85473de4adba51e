"""`tunepipe`: start the flows by hand from a terminal (runs started from the Prefect UI use prefect.yaml)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

# Set before Prefect is imported. The ephemeral server's telemetry heartbeat fights the CLI for its SQLite
# file ("database is locked"); tokenizers' thread pool warns after every fork.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
DEMO_CONFIG = Path("configs/demo.yaml")
DEMO_ASSETS = Path("runs/demo-assets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunepipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune, gate, export and register the model a config describes")
    run.add_argument("config", type=Path, help="pipeline config (YAML)")
    demo = commands.add_parser("demo", help=f"build the tiny model and demo data, then run {DEMO_CONFIG}")
    doctor = commands.add_parser("doctor", help="check this machine (packages, GPU, Prefect, MLflow, Ollama, hub), "
                                                "and what CONFIG needs; exit 1 when something it needs is missing")
    doctor.add_argument("config", type=Path, nargs="?", help="pipeline config (YAML) whose needs to check")
    for command in (run, demo, doctor):
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config field, e.g. --set train.max_steps=20 (repeatable)")
    schema = commands.add_parser("schema", help="print the config's JSON schema (for editor completion)")
    schema.add_argument("-o", "--output", type=Path, help="write it to this file instead")
    args = parser.parse_args(argv)

    from tasks.base_model import BaseModelError, resolve_base_model
    from tasks.config import ConfigError, json_schema, load_config
    from tasks.redact import redact

    if args.command == "schema":
        if args.output:
            args.output.write_text(json_schema())
        else:
            sys.stdout.write(json_schema())
        return 0
    if args.command == "doctor":
        try:
            cfg = load_config(args.config, args.overrides) if args.config else None
        except ConfigError as exc:
            print(redact(str(exc)), file=sys.stderr)
            return 2
        return print_doctor(cfg, args.config)
    if args.command == "demo":
        args.config = DEMO_CONFIG
        prepare_demo_assets(DEMO_ASSETS)
    try:
        # Fail on a bad config or an unusable base model before any server starts or stage runs.
        resolve_base_model(load_config(args.config, args.overrides).model)
    except (ConfigError, BaseModelError) as exc:
        print(redact(str(exc)), file=sys.stderr)
        return 2
    return run_finetune(args.config, args.overrides)


def prepare_demo_assets(root: Path) -> None:
    from rich.console import Console

    from tasks.demo_data import write_demo_dataset
    from tasks.tiny_model import build_tiny_model

    with Console(stderr=True).status("Building the tiny Qwen3 model and demo data (the first time ~30 s)..."):
        build_tiny_model(root / "tiny-qwen3")
        write_demo_dataset(root / "data")


def print_doctor(cfg: PipelineConfig | None, config: Path | None) -> int:
    """One screen: each check's status and detail; 1 when something `config` needs is missing."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tasks.doctor import diagnose

    console = Console()
    with console.status("Checking packages, GPU, Prefect, MLflow, Ollama and the hub..."):
        checks = diagnose(cfg)
    table = Table(title=f"tunepipe doctor{f' for {config}' if config else ''}", show_lines=False)
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    style = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}
    for check in checks:
        table.add_row(check.name, f"[{style[check.status]}]{check.status}[/]", escape(check.detail))
    console.print(table)
    failed = [check.name for check in checks if check.status == "fail"]
    if failed:
        console.print(f"[bold red]missing:[/] {', '.join(failed)}" + (f" (needed by {config})" if config else ""))
        if config == DEMO_CONFIG and not DEMO_ASSETS.exists():
            console.print(f"`tunepipe demo` builds the demo's model and data under {DEMO_ASSETS}/ first.")
        return 1
    console.print(f"[green]ready[/]{f' to run {config}' if config else ''}")
    return 0


def run_finetune(config: Path, overrides: list[str]) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    server_boot = start_prefect_api_in_background()
    from rich.markup import escape

    from flows.finetune import GateFailed, finetune
    from tasks.redact import redact

    if server_boot is not None:
        server_boot.join()

    state = finetune(str(config), overrides, return_state=True)
    report = Report(state.state_details.flow_run_id)
    report.stages()
    if state.is_completed():
        report.summary(state.result())
        return 0
    error = state.result(raise_on_failure=False)
    if isinstance(error, GateFailed):
        report.gate(error)
        return 3
    report.console.print(f"[bold red]failed:[/] {escape(redact(str(error)))}")
    return 1


def start_prefect_api_in_background() -> threading.Thread | None:
    """Boot Prefect's temporary API server (when no PREFECT_API_URL is set) while the pipeline imports.

    Prefect would start the same server on the flow's first API call; the server is its own process, so
    starting it seconds earlier overlaps its boot with our imports instead of adding to them.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    boot = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
    boot.start()
    return boot


class Report:
    """What the CLI prints after a run: each stage's state, then where everything is."""

    def __init__(self, flow_run_id):
        from rich.console import Console

        self.console = Console()
        self.flow_run_id = flow_run_id

    def stages(self) -> None:
        from rich.table import Table

        states = stage_states(self.flow_run_id)
        if not states:  # the run failed before its first stage: the error says why, an empty table says nothing
            return
        table = Table(title="stages")
        for column in ("stage", "state", "seconds"):
            table.add_column(column)
        for name, state, seconds in states:
            table.add_row(name, state, f"{seconds:.1f}")
        self.console.print(table)

    def summary(self, summary) -> None:
        from rich.table import Table

        self.metrics(summary.eval, summary.gate)
        table = Table(title="tunepipe run", show_header=False)
        rows = [
            ("GGUF", str(summary.gguf_path)),
            ("merged model", str(summary.merged_dir)),
            ("LoRA adapter", str(summary.adapter_dir)),
            ("gate", summary.gate.summary()),
            ("attempts", f"{summary.attempts}: {summary.retrain_outcome}"),
            ("report", str(summary.report.path)),
            ("MLflow run", summary.mlflow_run_id),
            ("Ollama model", f"{summary.ollama.model_name} ({summary.ollama.state})"),
            ("Ollama", summary.ollama.message),
        ]
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)
        self.console.print(
            f"Browse runs: mlflow ui --backend-store-uri {summary.mlflow_tracking_uri}   "
            "Flow runs: prefect server start (then open http://127.0.0.1:4200)"
        )

    def gate(self, error) -> None:
        self.metrics(error.eval, error.decision)
        self.console.print(f"[bold yellow]not promoted:[/] the evaluation gate failed ({error.outcome}); nothing "
                           "was exported or registered and the champion is unchanged.")
        for reason in error.decision.reasons:
            self.console.print(f"  [red]-[/] {reason}")
        self.console.print(f"report: {error.report.path}   MLflow run: {error.mlflow_run_id}")

    def metrics(self, report, decision) -> None:
        """Headline metrics of base / champion / candidate, plus every metric a gate rule checked."""
        from rich.table import Table

        from tasks.report import label, models

        columns = models(report)
        gated = {check.metric for check in decision.checks}
        names = sorted({n for s in columns for n in s.metrics if "." not in n} | gated)
        table = Table(title=f"held-out metrics ({report.n_samples} examples)")
        table.add_column("metric")
        for scores in columns:
            table.add_column(label(scores), justify="right")
        for name in names:
            values = [scores.metrics.get(name) for scores in columns]
            table.add_row(name + (" *" if name in gated else ""), *("-" if v is None else f"{v:.3f}" for v in values))
        self.console.print(table)
        self.console.print("* checked by the gate")


def stage_states(flow_run_id) -> list[tuple[str, str, float]]:
    """(task name, final state name, seconds) for every task run of a flow run, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100,
        )
    # Task run names carry a random suffix ("train-3b9"); the stage is the part before it.
    return [(r.name.rsplit("-", 1)[0], r.state_name or "?", r.total_run_time.total_seconds()) for r in runs]
