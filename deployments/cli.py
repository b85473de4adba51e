"""`tunepipe`: start the flows by hand from a terminal (runs started from the Prefect UI use prefect.yaml)."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunepipe.tasks.patches.prefect import TemporaryServer
    from tunepipe.tasks.runtime.config import PipelineConfig

# Set before Prefect is imported. The ephemeral server's telemetry heartbeat fights the CLI for its SQLite
# file ("database is locked"); tokenizers' thread pool warns after every fork.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
DEMO_CONFIG = Path("configs/demo.yaml")
DEMO_ASSETS = Path("runs/demo-assets")
UNSERVED = 4  # exit status of `run`: trained, gated and exported, but not served; finish with `register`
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"  # TrackingConfig's default, without importing the config here


def main(argv: list[str] | None = None) -> int:
    status = command(argv)
    if argv is None:
        # `tunepipe` itself, which exits next: the interpreter's teardown would otherwise collect every object
        # of the run's libraries (seconds); the exit handlers still run, and so do finalizers freed by refcount.
        gc.freeze()
    return status


def command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="tunepipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune, gate, export and register the model a config describes")
    demo = commands.add_parser("demo", help=f"write the demo data, then fine-tune SmolLM2-135M as {DEMO_CONFIG} says")
    retrain = commands.add_parser(
        "retrain", help="fold new RAG examples into the data set and retrain when there are enough (rag section)"
    )
    evaluate = commands.add_parser("evaluate", help="score a trained model on the config's test split")
    status = commands.add_parser("status", help="champion, last runs, pending registrations, RAG watermark")
    trace = commands.add_parser("trace", help="from an Ollama tag NAME:VERSION to its MLflow run and training rows")
    trace.add_argument("tag", help="Ollama model tag, e.g. tunepipe-demo:3 (NAME:latest means the champion)")
    for command in (run, retrain, evaluate, status, trace):
        command.add_argument("config", type=Path, help="pipeline config (YAML)")
    evaluate.add_argument("model", help="MLflow run id of a finetune run, or vN for version N of the registered model")
    trace.add_argument("--rows", type=int, default=10, help="source rows to print (default 10; 0: none)")
    doctor = commands.add_parser(
        "doctor",
        help="check this machine (packages, GPU, Prefect, MLflow, Ollama, hub), "
        "and what CONFIG needs; exit 1 when something it needs is missing",
    )
    doctor.add_argument("config", type=Path, nargs="?", help="pipeline config (YAML) whose needs to check")
    check = commands.add_parser(
        "check",
        help="load, check and format the data only; print the data report and the run plan "
        "(exit 1 when a run would fail)",
    )
    check.add_argument("config", type=Path, help="pipeline config (YAML)")
    for command in (run, demo, doctor, check, retrain, evaluate, status, trace):
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set train.max_steps=20 (repeatable)",
        )
    schema = commands.add_parser("schema", help="print the config's JSON schema (for editor completion)")
    schema.add_argument("-o", "--output", type=Path, help="write it to this file instead")
    register = commands.add_parser(
        "register", help="finish serving a run whose Ollama was not reachable: register, smoke-test and promote it"
    )
    register.add_argument("run_id", help="MLflow run id of the finetune run (printed at its end)")
    rollback = commands.add_parser(
        "rollback", help="move the champion (MLflow alias and Ollama NAME:latest) back to the version it replaced"
    )
    rollback.add_argument("name", help="registered model name: the pipeline's `name`")
    for command in (register, rollback):
        command.add_argument(
            "--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})"
        )
    rollback.add_argument("--ollama-host", help="Ollama base URL (default $OLLAMA_HOST or http://127.0.0.1:11434)")
    args = parser.parse_args(argv)

    from tunepipe.tasks.runtime.config import ConfigError, json_schema, load_config
    from tunepipe.tasks.runtime.redact import redact

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
    if args.command == "register":
        return until_stopped(lambda: run_register(args.run_id, args.tracking_uri))
    if args.command == "rollback":
        return run_rollback(args.name, args.tracking_uri, args.ollama_host)
    if args.command == "demo":
        args.config = DEMO_CONFIG
        prepare_demo_assets(DEMO_ASSETS)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command in ("status", "trace"):  # they read what runs recorded; no model needed
            from tunepipe.deployments.status import print_status, print_trace

            return print_status(cfg) if args.command == "status" else print_trace(cfg, args.tag, args.rows)
    except ConfigError as exc:
        print(redact(str(exc)), file=sys.stderr)
        return 2
    if args.command in ("run", "demo"):
        # The demo runs where no Ollama may be: an unserved model is reported, not an error.
        return until_stopped(lambda: run_finetune(cfg, unserved_status=0 if args.command == "demo" else UNSERVED))
    if not usable_base_model(cfg):
        return 2
    if args.command == "check":
        return run_check(cfg)
    if args.command == "retrain":
        return until_stopped(lambda: run_retrain(cfg))
    return until_stopped(lambda: run_evaluate(cfg, args.model))


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so that it unwinds as on Ctrl-C (see `until_stopped`)."""


def until_stopped(command: Callable[[], int]) -> int:
    """Run a flow command; SIGTERM (`kill`, a scheduler, a container stop) ends it as Ctrl-C does.

    Either way Prefect marks the stage that was running and the flow run Crashed, the stage stops its worker
    process, the MLflow run ends FAILED, and the exit handlers stop Prefect's temporary server. SIGTERM's
    default would end the process on the spot and leave the server (and a worker) running.
    """

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return command()
    except (KeyboardInterrupt, Terminated) as exc:
        how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(
            f"stopped by {how}: the stage that was running is marked Crashed (Prefect) and the MLflow run "
            "FAILED. The same command resumes: finished stages are cache hits and training goes on from its "
            "last checkpoint.",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(cfg) -> int:
    """`tunepipe check`: the data report and the run plan; 1 when the data would stop a run."""
    from rich.console import Console

    from tunepipe.deployments.output import print_data_report, print_run_plan
    from tunepipe.deployments.run_plan import check_run
    from tunepipe.tasks.data.check import DataCheckError
    from tunepipe.tasks.data.containers import DataFileError
    from tunepipe.tasks.runtime.memory_plan import WillNotFit
    from tunepipe.tasks.train.environment import TrainingEnvironmentError

    quiet_environment()
    console = Console()
    try:
        with Console(stderr=True).status("Loading, checking and formatting the data..."):
            checked, plan = check_run(cfg)
    except (DataFileError, FileNotFoundError) as exc:
        console.print(f"[bold red]data cannot be used:[/]\n{exc}", highlight=False, soft_wrap=True)
        return 1
    except DataCheckError as exc:
        print_data_report(console, exc.checked)
        console.print(f"[bold red]a run would fail:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    except (TrainingEnvironmentError, WillNotFit) as exc:
        console.print(f"[bold red]a run would fail:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    print_data_report(console, checked)
    print_run_plan(console, plan)
    return 0


def prepare_demo_assets(root: Path) -> None:
    from rich.console import Console

    from tunepipe.tasks.demo.data import DEMO_ROWS, write_demo_dataset, write_demo_rag_log
    from tunepipe.tasks.model.packaged import DEMO_MODEL, PACKAGED, packaged_gguf

    with Console(stderr=True).status("Writing the demo data (the first time a few seconds)..."):
        # The demo's base model: SmolLM2-135M-Instruct as set-up fetched it, linked under the name the config uses.
        model = root / PACKAGED[DEMO_MODEL].file_name
        if not model.exists():
            model.parent.mkdir(parents=True, exist_ok=True)
            model.unlink(missing_ok=True)  # a link left pointing at a cache that was cleared
            model.symlink_to(packaged_gguf(DEMO_MODEL))
        write_demo_dataset(root / "data", *DEMO_ROWS)
        if not (root / "rag.db").exists():  # what `tunepipe retrain configs/demo.yaml` ingests
            write_demo_rag_log(root / "rag.db")


def print_doctor(cfg: PipelineConfig | None, config: Path | None) -> int:
    """One screen: each check's status and detail; 1 when something `config` needs is missing."""
    from rich.console import Console

    from tunepipe.deployments.doctor import diagnose
    from tunepipe.deployments.output import print_checks

    console = Console()
    with console.status("Checking packages, GPU, Prefect, MLflow, Ollama and the hub..."):
        checks = diagnose(cfg)
    print_checks(console, checks, config)
    failed = [check.name for check in checks if check.status == "fail"]
    if failed:
        console.print(f"[bold red]missing:[/] {', '.join(failed)}" + (f" (needed by {config})" if config else ""))
        if config == DEMO_CONFIG and not DEMO_ASSETS.exists():
            console.print(f"`tunepipe demo` writes the demo's data and links its model under {DEMO_ASSETS}/ first.")
        return 1
    console.print(f"[green]ready[/]{f' to run {config}' if config else ''}")
    return 0


def usable_base_model(cfg) -> bool:
    """Whether the config's base model resolves (it fails before any stage runs); if not, say why."""
    from tunepipe.tasks.model.base import BaseModelError, resolve_base_model
    from tunepipe.tasks.runtime.redact import redact

    try:
        resolve_base_model(cfg.model, cfg.ollama)
    except BaseModelError as exc:
        print(redact(str(exc)), file=sys.stderr)
        return False
    return True


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def spawn_temporary_server() -> TemporaryServer | None:
    """Quiet Prefect (the server inherits the environment), then start its temporary server early when the
    Prefect patch allows (tasks/patches/prefect.py)."""
    from tunepipe.tasks.patches.prefect import start_temporary_server

    quiet_environment()
    return start_temporary_server()


def start_prefect(early: TemporaryServer | None) -> None:
    """Import the flows while Prefect's temporary server boots, then point Prefect at it once it answers;
    `early`: from `spawn_temporary_server` (None: an API is set, or Prefect starts its own server)."""
    import tunepipe.flows.finetune  # noqa: F401  (the imports overlap the server's boot)
    from tunepipe.tasks.patches.prefect import use_temporary_server

    use_temporary_server(early)


def failed(report, state) -> int:
    from rich.markup import escape

    from tunepipe.tasks.runtime.redact import redact

    report.console.print(
        f"[bold red]failed:[/] {escape(redact(str(state.result(raise_on_failure=False))))}", soft_wrap=True
    )
    return 1


def run_finetune(cfg, unserved_status: int) -> int:
    # Both before anything imports Prefect (seconds): the server's boot and the training worker's imports
    # (unsloth's, on a GPU) overlap all that follows, the base model's check included.
    early = spawn_temporary_server()
    from tunepipe.deployments.output import Report
    from tunepipe.tasks.runtime.worker import spare_workers
    from tunepipe.tasks.train.prestart import prestart_training

    with spare_workers():  # the training spare stops with the run, even one that fails before its flow starts
        prestart_training(cfg.train.backend, cfg.train.mode, cfg.train.devices)
        if not usable_base_model(cfg):
            if early is not None:
                early.discard()
            return 2
        from tunepipe.tasks.runtime.tracking import open_store

        open_store(cfg.tracking)  # while the server boots: a re-run's first stage would wait for it
        start_prefect(early)
        from tunepipe.flows.finetune import GateFailed, finetune

        state = finetune(cfg, return_state=True)
    report = Report(state.state_details.flow_run_id)
    report.stages()
    if state.is_completed():
        summary = state.result()
        report.summary(summary)
        return 0 if summary.serving.served else unserved_status
    error = state.result(raise_on_failure=False)
    if isinstance(error, GateFailed):
        report.gate(error)
        return 3
    return failed(report, state)


def run_retrain(cfg) -> int:
    start_prefect(spawn_temporary_server())
    from tunepipe.deployments.output import Report
    from tunepipe.flows.retrain import retrain

    state = retrain(cfg, return_state=True)
    report = Report(state.state_details.flow_run_id)
    if not state.is_completed():
        return failed(report, state)
    outcome = state.result()
    if outcome.summary is not None:
        report.summary(outcome.summary)
    if outcome.snapshot is not None:
        snapshot = outcome.snapshot
        report.console.print(
            f"dataset v{snapshot.version} {snapshot.fingerprint[:12]}: {snapshot.rows_by_source} ({snapshot.folder})",
            soft_wrap=True,
        )
    color = {"promoted": "green", "kept_champion": "yellow", "nothing_to_do": "cyan"}[outcome.status]
    report.console.print(f"[bold {color}]{outcome.status.replace('_', ' ')}:[/] {outcome.reason}")
    return 0


def run_evaluate(cfg, model: str) -> int:
    start_prefect(spawn_temporary_server())
    from tunepipe.deployments.output import Report
    from tunepipe.flows.evaluate import evaluate_model

    state = evaluate_model(cfg, model, return_state=True)
    report = Report(state.state_details.flow_run_id)
    report.stages()
    if not state.is_completed():
        return failed(report, state)
    evaluation = state.result()
    report.console.print(f"{model} (run {evaluation.model_run_id})", soft_wrap=True)
    report.metrics(evaluation.eval, evaluation.gate)
    report.checks(evaluation.gate)
    report.console.print(f"gate {evaluation.gate.summary()}\nMLflow run {evaluation.mlflow_run_id}", soft_wrap=True)
    return 0 if evaluation.gate.passed else 3


def run_register(run_id: str, tracking_uri: str) -> int:
    from rich.console import Console
    from rich.markup import escape

    quiet_environment()
    from tunepipe.flows.serve import register_run

    state = register_run(run_id, tracking_uri, return_state=True)
    console = Console()
    if not state.is_completed():
        console.print(f"[bold red]failed:[/] {escape(str(state.result(raise_on_failure=False)))}", soft_wrap=True)
        return 1
    serving = state.result()
    console.print(serving.registration.message, markup=False, soft_wrap=True)
    if not serving.served:
        return UNSERVED
    console.print(f"smoke test: {serving.smoke.summary()}", markup=False, soft_wrap=True)
    console.print(
        f"champion: {serving.promotion.name} v{serving.promotion.version} "
        f"({serving.promotion.ollama_tag}, also {serving.promotion.ollama_tag.rsplit(':', 1)[0]}:latest)",
        soft_wrap=True,
    )
    return 0


def run_rollback(name: str, tracking_uri: str, ollama_host: str | None) -> int:
    from tunepipe.tasks.integrations.model_registry import rollback
    from tunepipe.tasks.integrations.ollama.client import OllamaClient, OllamaError
    from tunepipe.tasks.integrations.ollama.host import ollama_host as resolve_host

    host = resolve_host(ollama_host)
    try:
        move = rollback(tracking_uri, name, OllamaClient(host, timeout_s=60))
    except (ValueError, OllamaError) as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(
        f"{name}: champion moved back from v{move.previous} to v{move.version} "
        f"({move.ollama_tag} is now {move.ollama_tag.rsplit(':', 1)[0]}:latest)"
    )
    return 0
