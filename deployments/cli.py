"""`tunepipe`: start the flows by hand from a terminal (runs started from the Prefect UI use prefect.yaml)."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.runtime.config import PipelineConfig

# Set before Prefect is imported. The ephemeral server's telemetry heartbeat fights the CLI for its SQLite
# file ("database is locked"); tokenizers' thread pool warns after every fork.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
DEMO_CONFIG = Path("configs/demo.yaml")
DEMO_ASSETS = Path("runs/demo-assets")
UNSERVED = 4  # exit status of `run`: trained, gated and exported, but not served; finish with `register`
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"  # TrackingConfig's default, without importing the config here
SERVER_STARTUP_TIMEOUT_S = 120  # Prefect's temporary server; its own default (20 s) is short on a busy machine


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
        "retrain", help="fold new RAG examples into the data set and retrain when there are enough (rag section)")
    evaluate = commands.add_parser("evaluate", help="score a trained model on the config's test split")
    status = commands.add_parser("status", help="champion, last runs, pending registrations, RAG watermark")
    trace = commands.add_parser("trace", help="from an Ollama tag NAME:VERSION to its MLflow run and training rows")
    trace.add_argument("tag", help="Ollama model tag, e.g. tunepipe-demo:3 (NAME:latest means the champion)")
    for command in (run, retrain, evaluate, status, trace):
        command.add_argument("config", type=Path, help="pipeline config (YAML)")
    evaluate.add_argument("model", help="MLflow run id of a finetune run, or vN for version N of the registered model")
    trace.add_argument("--rows", type=int, default=10, help="source rows to print (default 10; 0: none)")
    doctor = commands.add_parser("doctor", help="check this machine (packages, GPU, Prefect, MLflow, Ollama, hub), "
                                                "and what CONFIG needs; exit 1 when something it needs is missing")
    doctor.add_argument("config", type=Path, nargs="?", help="pipeline config (YAML) whose needs to check")
    check = commands.add_parser(
        "check", help="load, check and format the data only; print the data report and the run plan "
                      "(exit 1 when a run would fail)")
    check.add_argument("config", type=Path, help="pipeline config (YAML)")
    for command in (run, demo, doctor, check, retrain, evaluate, status, trace):
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config field, e.g. --set train.max_steps=20 (repeatable)")
    schema = commands.add_parser("schema", help="print the config's JSON schema (for editor completion)")
    schema.add_argument("-o", "--output", type=Path, help="write it to this file instead")
    register = commands.add_parser("register", help="finish serving a run whose Ollama was not reachable: "
                                                    "register, smoke-test and promote it")
    register.add_argument("run_id", help="MLflow run id of the finetune run (printed at its end)")
    rollback = commands.add_parser("rollback", help="move the champion (MLflow alias and Ollama NAME:latest) "
                                                    "back to the version it replaced")
    rollback.add_argument("name", help="registered model name: the pipeline's `name`")
    for command in (register, rollback):
        command.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                             help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    rollback.add_argument("--ollama-host", help="Ollama base URL (default $OLLAMA_HOST or http://127.0.0.1:11434)")
    args = parser.parse_args(argv)

    from tasks.runtime.config import ConfigError, json_schema, load_config
    from tasks.runtime.redact import redact

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
            from deployments.status import print_status, print_trace

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
        print(f"stopped by {how}: the stage that was running is marked Crashed (Prefect) and the MLflow run "
              "FAILED. The same command resumes: finished stages are cache hits and training goes on from its "
              "last checkpoint.", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(cfg) -> int:
    """`tunepipe check`: the data report and the run plan; 1 when the data would stop a run."""
    from rich.console import Console

    from deployments.run_plan import check_run
    from tasks.data.check import DataCheckError
    from tasks.data.containers import DataFileError
    from tasks.runtime.memory_plan import WillNotFit
    from tasks.train.loop import TrainingEnvironmentError

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


def print_data_report(console, checked) -> None:
    from rich.table import Table

    files = Table(title="data files (kept + quarantined = read)")
    files.add_column("file", overflow="fold")  # a path wraps onto more lines, never cut
    for column in ("read", "kept train", "kept validation", "kept test", "quarantined"):
        files.add_column(column, justify="right")
    for f in checked.files:
        files.add_row(f.source, str(f.rows_read), str(f.kept_train), str(f.kept_validation), str(f.kept_eval),
                      str(f.quarantined))
    console.print(files)
    failed = [(split, e) for split, report in (("train", checked.train), ("validation", checked.validation),
                                               ("test", checked.eval))
              for e in report.expectations if not e["success"]]
    if failed:
        table = Table(title="failed expectations (Great Expectations)")
        for column in ("split", "expectation", "column", "rows"):
            table.add_column(column)
        for split, e in failed:
            table.add_row(split, e["expected"], e["column"], str(e["unexpected_count"]))
        console.print(table)
    for message in checked.first_rejections:
        console.print(f"  set aside: {message}", highlight=False, soft_wrap=True)
    console.print(f"{checked.rows_quarantined} of {checked.rows_read} rows set aside: {checked.quarantine_path}\n"
                  f"Data Docs: {checked.data_docs}\nSummary (JSON): {checked.summary_path}", highlight=False,
                  soft_wrap=True)


def print_run_plan(console, plan) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="run plan", show_header=False)
    for name, value in (
        ("rows (train / validation / test)", f"{plan.train_rows} / {plan.validation_rows} / {plan.eval_rows}"),
        ("tokens (train / validation / test)", f"{plan.train_tokens} / {plan.validation_tokens} / {plan.eval_tokens}"),
        ("trained tokens (carry the loss)", str(plan.train_trained_tokens)),
        ("longest example", f"{plan.longest_example_tokens} tokens"),
        ("examples per step", str(plan.examples_per_step)),
        ("steps per epoch", str(plan.steps_per_epoch)),
        ("steps", f"{plan.steps} ({plan.epochs:.2f} epochs)"),
        ("device", f"{plan.environment.device}, {plan.environment.precision}"),
        ("memory estimate", f"{plan.environment.estimate_gib:.2f} GiB"
                            + (f" of {plan.environment.free_gib:.1f} GiB free" if plan.environment.free_gib else "")
                            + " (" + ", ".join(f"{k} {v:.2f}" for k, v in plan.environment.estimate.items()) + ")"),
        ("gradient checkpointing", {True: "on", False: "off", "offload": "on, offloaded to CPU memory"}[
            plan.environment.gradient_checkpointing]),
        ("time estimate", _time_estimate(plan)),
    ):
        table.add_row(name, value)
    console.print(table)
    if plan.memory is not None:
        stages = Table(title=f"memory plan ({escape(plan.memory.gpu)})")
        for column in ("stage", "needs", "of", "available", "note"):
            stages.add_column(column)
        for stage in plan.memory.stages:
            available = "unknown" if stage.available_gib is None else f"{stage.available_gib:.1f} GiB"
            stages.add_row(stage.stage, f"{stage.need_gib:.2f} GiB", stage.resource, available, escape(stage.note))
        console.print(stages)
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def _time_estimate(plan) -> str:
    estimate = plan.time_estimate
    if estimate is None:
        return (f"none yet: this base model has not trained on {plan.environment.device} in this workdir; "
                "the first run's speed sets it")
    return (f"{estimate.seconds / 60:.1f} min for the steps (model loading not included), at the "
            f"{estimate.tokens_per_s:,.0f} tokens/s measured in {estimate.measured_in}")


def prepare_demo_assets(root: Path) -> None:
    from rich.console import Console

    from tasks.demo.data import DEMO_ROWS, write_demo_dataset, write_demo_rag_log
    from tasks.model.packaged import DEMO_MODEL, PACKAGED, packaged_gguf

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
    from rich.markup import escape
    from rich.table import Table

    from deployments.doctor import diagnose

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
            console.print(f"`tunepipe demo` writes the demo's data and links its model under {DEMO_ASSETS}/ first.")
        return 1
    console.print(f"[green]ready[/]{f' to run {config}' if config else ''}")
    return 0


def usable_base_model(cfg) -> bool:
    """Whether the config's base model resolves (it fails before any stage runs); if not, say why."""
    from tasks.model.base import BaseModelError, resolve_base_model
    from tasks.runtime.redact import redact

    try:
        resolve_base_model(cfg.model, cfg.ollama)
    except BaseModelError as exc:
        print(redact(str(exc)), file=sys.stderr)
        return False
    return True


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def start_prefect(early: ServerProcess | None) -> None:
    """Import the flows while Prefect's temporary API server boots, then point Prefect at it once it answers;
    `early`: the server's process, from `spawn_temporary_server` (which also quiets Prefect; None: a Prefect API
    is set in the environment). An API configured elsewhere (a Prefect profile, prefect.toml), which only
    Prefect's settings know, is used instead, and the temporary server is stopped unused."""
    from prefect.settings import PREFECT_API_URL

    import flows.finetune  # noqa: F401  (the imports overlap the server's boot)

    if early is not None and PREFECT_API_URL.value():
        early.discard()
    elif early is not None:
        server_logger().info("Starting temporary server on %s", early.api_url.removesuffix("/api"))
        early.wait_until_up()
        use_temporary_server(early)


def failed(report, state) -> int:
    from rich.markup import escape

    from tasks.runtime.redact import redact

    report.console.print(f"[bold red]failed:[/] {escape(redact(str(state.result(raise_on_failure=False))))}")
    return 1


def run_finetune(cfg, unserved_status: int) -> int:
    # Both before anything imports Prefect (seconds): the server's boot and the training worker's imports
    # (unsloth's, on a GPU) overlap all that follows, the base model's check included.
    early = spawn_temporary_server()
    from tasks.runtime.worker import spare_workers
    from tasks.train.prestart import prestart_training

    with spare_workers():  # the training spare stops with the run, even one that fails before its flow starts
        prestart_training(cfg.train.backend, cfg.train.mode, cfg.train.devices)
        if not usable_base_model(cfg):
            if early is not None:
                early.discard()
            return 2
        from tasks.runtime.tracking import open_store

        open_store(cfg.tracking)  # while the server boots: a re-run's first stage would wait for it
        start_prefect(early)
        from flows.finetune import GateFailed, finetune

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
    from flows.retrain import retrain

    state = retrain(cfg, return_state=True)
    report = Report(state.state_details.flow_run_id)
    if not state.is_completed():
        return failed(report, state)
    outcome = state.result()
    if outcome.summary is not None:
        report.summary(outcome.summary)
    if outcome.snapshot is not None:
        snapshot = outcome.snapshot
        report.console.print(f"dataset v{snapshot.version} {snapshot.fingerprint[:12]}: {snapshot.rows_by_source} "
                             f"({snapshot.folder})")
    color = {"promoted": "green", "kept_champion": "yellow", "nothing_to_do": "cyan"}[outcome.status]
    report.console.print(f"[bold {color}]{outcome.status.replace('_', ' ')}:[/] {outcome.reason}")
    return 0


def run_evaluate(cfg, model: str) -> int:
    start_prefect(spawn_temporary_server())
    from flows.evaluate import evaluate_model

    state = evaluate_model(cfg, model, return_state=True)
    report = Report(state.state_details.flow_run_id)
    report.stages()
    if not state.is_completed():
        return failed(report, state)
    evaluation = state.result()
    report.console.print(f"{model} (run {evaluation.model_run_id})")
    report.metrics(evaluation.eval, evaluation.gate)
    report.checks(evaluation.gate)
    report.console.print(f"gate {evaluation.gate.summary()}\nMLflow run {evaluation.mlflow_run_id}")
    return 0 if evaluation.gate.passed else 3


def run_register(run_id: str, tracking_uri: str) -> int:
    from rich.console import Console

    quiet_environment()
    from flows.serve import register_run

    state = register_run(run_id, tracking_uri, return_state=True)
    console = Console()
    if not state.is_completed():
        console.print(f"[bold red]failed:[/] {state.result(raise_on_failure=False)}")
        return 1
    serving = state.result()
    console.print(serving.registration.message)
    if not serving.served:
        return UNSERVED
    console.print(f"smoke test: {serving.smoke.summary()}")
    console.print(f"champion: {serving.promotion.name} v{serving.promotion.version} "
                  f"({serving.promotion.ollama_tag}, also {serving.promotion.ollama_tag.rsplit(':', 1)[0]}:latest)")
    return 0


def run_rollback(name: str, tracking_uri: str, ollama_host: str | None) -> int:
    from tasks.integrations.model_registry import rollback
    from tasks.integrations.ollama.client import OllamaClient, OllamaError
    from tasks.integrations.ollama.host import ollama_host as resolve_host

    host = resolve_host(ollama_host)
    try:
        move = rollback(tracking_uri, name, OllamaClient(host, timeout_s=60))
    except (ValueError, OllamaError) as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: champion moved back from v{move.previous} to v{move.version} "
          f"({move.ollama_tag} is now {move.ollama_tag.rsplit(':', 1)[0]}:latest)")
    return 0


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_up(self, timeout_s: float = SERVER_STARTUP_TIMEOUT_S) -> None:
        """Wait for the server's health check, as Prefect's `SubprocessASGIServer.start` does: a server whose
        port was taken meanwhile (uvicorn's exit status 3) starts again on another."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() == 3:
                    self.port = free_port()
                    self.process = server_process(*server_command(self.port))
                elif self.process.poll() is not None:
                    raise RuntimeError(f"Prefect's temporary server exited with status {self.process.returncode}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.ConnectError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s")

    def discard(self) -> None:
        """Stop a server nobody used, without a word (it was never announced)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            server_logger().info("Stopping temporary server on %s", self.api_url.removesuffix("/api"))
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_logger():
    from prefect.logging import get_logger

    return get_logger()  # the logger Prefect's own temporary server reports on


def spawn_temporary_server() -> ServerProcess | None:
    """Start the process of Prefect's temporary API server now, unless `PREFECT_API_URL` is set, so that its
    boot overlaps the CLI's imports (Prefect's own and the flows') instead of following them; `start_prefect`
    waits for it. The run stops it at exit, after Prefect's own exit handlers have sent the run's last states
    and events."""
    quiet_environment()  # the server inherits it
    if os.environ.get("PREFECT_API_URL"):
        return None
    port = free_port()
    early = ServerProcess(server_process(*server_command(port)), port)
    atexit.register(early.stop)  # registered before Prefect's handlers, so it runs after them
    return early


def free_port() -> int:
    with socket.socket() as probe:  # should it be taken before the server binds it, the server starts again
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment Prefect 3.9's `SubprocessASGIServer._run_uvicorn_command` starts its
    temporary server with, without importing Prefect (seconds): Prefect also passes its settings as environment
    variables, which the server reads for itself from the same environment, folder and profile
    (tests/test_stop_signals.py holds the two equal)."""
    prefect_package = Path(importlib.util.find_spec("prefect").origin).parent
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_package.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
            "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return args, env


def server_process(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The server in a process group of its own, so that Ctrl-C (which the terminal sends to its whole
    foreground group) reaches the run but not the server: the run reports its Crashed state to the server,
    then the exit handlers stop it. In the terminal's group the server would die first and the run would
    retry its last report against nothing for minutes."""
    return subprocess.Popen(args, env=env, process_group=0)


def use_temporary_server(server: ServerProcess) -> None:
    """Point this process's Prefect clients (and the workers it starts) at the temporary server, as a configured
    `PREFECT_API_URL` would: Prefect's own `SubprocessASGIServer` would otherwise be imported only to wait
    for it, and that import is Prefect's whole server (seconds). The UI is off there: no UI links are logged."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()


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

        self.metrics(summary.eval, summary.gate, summary.validation)
        self.base_to_candidate(summary.eval, summary.gate)
        self.checks(summary.gate)
        table = Table(title="tunepipe run", show_header=False)
        parity = ", ".join(f"{g.gguf_type} exact {g.scores.get('exact_match', 0):.2f} stop "
                           f"{g.scores.get('stop_rate', 0):.2f}" for g in summary.parity.ggufs)
        rows = [
            ("GGUF served", str(summary.gguf_path)),
            ("GGUF parity", parity),
            ("merged model", str(summary.exported.merged_dir)),
            ("LoRA adapter", str(summary.exported.adapter_dir or "none (full fine-tuning)")),
            ("gate (test split)", summary.gate.summary()),
            ("attempts", f"{summary.attempts}: {summary.retrain_outcome}"),
            ("report", str(summary.report.path)),
            ("data checks (GX Data Docs)", f"{summary.data_docs} (MLflow: data_checks/data_docs/index.html)"),
            ("MLflow run", summary.mlflow_run_id),
            ("Ollama", summary.serving.registration.message),
            ("champion", f"v{summary.serving.promotion.version}" if summary.serving.served else "unchanged"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)
        self.console.print(
            f"Browse runs: mlflow ui --backend-store-uri {summary.mlflow_tracking_uri}   "
            "Flow runs: prefect server start (then open http://127.0.0.1:4200)"
        )

    def base_to_candidate(self, report, decision) -> None:
        """What fine-tuning changed, and one test example answered by both: the base's and the candidate's."""
        from rich.markup import escape

        from tasks.evaluate.report import base_to_candidate

        changes = base_to_candidate(report, [check.metric for check in decision.checks])
        self.console.print(f"[bold]base → candidate[/] on {report.n_samples} {report.split} examples: "
                           + ", ".join(changes), highlight=False, soft_wrap=True)
        first = report.samples_path.read_text(encoding="utf-8").partition("\n")[0]
        if first:
            sample = json.loads(first)
            for who in ("base", "candidate"):
                answer = " ".join(sample[who]["answer"].split())
                answer = answer if len(answer) <= 160 else answer[:160] + " ..."
                self.console.print(f"  {who:>9} answered {report.split} {sample['source']}: {escape(answer)}",
                                   highlight=False, soft_wrap=True)

    def checks(self, decision) -> None:
        """Each gate rule in words: the differences to base and champion with their intervals and n."""
        from rich.markup import escape

        for check in decision.checks:
            mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
            self.console.print(f"  {mark} {escape(check.reason)}", highlight=False, soft_wrap=True)

    def gate(self, error) -> None:
        self.metrics(error.eval, error.decision, error.validation)
        self.base_to_candidate(error.eval, error.decision)
        self.console.print(f"[bold yellow]not promoted:[/] the evaluation gate failed on the test split (retrain "
                           f"loop: {error.outcome}); nothing was exported or registered and the champion is unchanged.")
        for reason in error.decision.reasons:
            self.console.print(f"  [red]-[/] {reason}")
        self.console.print(f"report: {error.report.path}   MLflow run: {error.mlflow_run_id}")

    def metrics(self, report, decision, validation=None) -> None:
        """Headline metrics of base / champion / candidate on `report`'s split, beside their `validation` scores
        when given, plus every metric a gate rule checked."""
        from rich.table import Table

        from tasks.evaluate.gate import RETENTION_CHECK
        from tasks.evaluate.report import label, models

        splits = [r for r in (validation, report) if r is not None]
        columns = [(r, scores) for scores in models(report) for r in splits]
        gated = {check.metric for check in decision.checks} - {RETENTION_CHECK, "regressions"}
        names = sorted({n for r in splits for s in models(r) for n in s.metrics if "." not in n} | gated)
        title = ", ".join(f"{r.split}: {r.n_samples} examples" for r in splits)
        table = Table(title=f"metrics ({title})")
        table.add_column("metric")
        for r, scores in columns:
            table.add_column(f"{label(scores)} {r.split}", justify="right")
        for name in names:
            values = [next((s.metrics.get(name) for s in models(r) if s.name == scores.name), None)
                      for r, scores in columns]
            table.add_row(name + (" *" if name in gated else ""), *("-" if v is None else f"{v:.3f}" for v in values))
        self.console.print(table)
        self.console.print(f"* checked by the gate (on {report.split})")
        if (kept := report.retention) is not None:
            self.console.print(f"retention on {kept.n_prompts} general prompts: loss on the base's answers base "
                               f"{kept.base_loss:.3f} → candidate {kept.candidate_loss:.3f} ({kept.loss_increase:+.3f} "
                               f"nats per token){' *' if RETENTION_CHECK in {c.metric for c in decision.checks} else ''}",
                               highlight=False)


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
