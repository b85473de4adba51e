"""What the CLI prints: the data report, the run plan, the doctor's checks, and a run's stages, metrics, gate
and outputs.

Ids and paths are what a reader copies into the next command, so no table cuts or splits them: a table whose
rows do not fit the terminal on one line each is printed as one block of lines per row instead, which the
terminal wraps itself (an 80-column terminal included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

UNLIMITED = 1_000_000  # a width at which nothing wraps


def fits(console: Console, table: Table) -> bool:
    """Whether `table` fits the terminal with its `no_wrap` columns whole and the others at their longest word."""
    from rich.measure import Measurement

    options = console.options.update_width(UNLIMITED)
    needed = console.measure(table, options=options).maximum
    for column in table.columns:
        if not column.no_wrap:
            cells = [column.header, *column.cells] if table.show_header else list(column.cells)
            sizes = [Measurement.get(console, options, cell) for cell in cells]
            needed -= max((size.maximum for size in sizes), default=0) - max(
                (size.minimum for size in sizes), default=0
            )
    return needed <= console.width


def print_fitted(console: Console, table: Table) -> None:
    """`table` as it is when its `no_wrap` columns (ids, paths, text that holds them) fit the terminal whole,
    the others at their longest word; otherwise each row as a block of lines, its first cell then
    `header  value` for the others (a table without headers: `name  value` lines), which rich does not break:
    the terminal wraps them, and a copied id or path comes out whole."""
    from rich.text import Text

    if fits(console, table):
        console.print(table)
        return

    def text(cell) -> Text:
        return cell if isinstance(cell, Text) else Text.from_markup(str(cell))

    def line(*parts) -> None:
        console.print(Text.assemble(*parts), soft_wrap=True, highlight=False)

    rows = [[text(cell) for cell in row] for row in zip(*(list(column.cells) for column in table.columns))]
    if table.title:
        console.print(text(table.title), style="table.title", soft_wrap=True, highlight=False)
    if not table.show_header:  # name and value
        width = max((len(name) for name, *_ in rows), default=0)
        for name, *values in rows:
            line("  ", name, " " * (width - len(name)), "  ", *values)
        return
    headers = [str(column.header) for column in table.columns[1:]]
    width = max(map(len, headers), default=0)
    for first, *values in rows:
        line("  ", first)
        for header, value in zip(headers, values):
            line("    ", (header.ljust(width), "table.header"), "  ", value)
    if not rows:
        line("  none")


def print_data_report(console: Console, checked) -> None:
    from rich.markup import escape
    from rich.table import Table

    files = Table(title="data files (kept + quarantined = read)")
    files.add_column("file", no_wrap=True)
    for column in ("read", "kept train", "kept validation", "kept test", "quarantined"):
        files.add_column(column, justify="right", overflow="fold")
    for f in checked.files:
        files.add_row(
            escape(f.source),
            str(f.rows_read),
            str(f.kept_train),
            str(f.kept_validation),
            str(f.kept_eval),
            str(f.quarantined),
        )
    print_fitted(console, files)
    failed = [
        (split, e)
        for split, report in (("train", checked.train), ("validation", checked.validation), ("test", checked.eval))
        for e in report.expectations
        if not e["success"]
    ]
    if failed:
        table = Table(title="failed expectations (Great Expectations)")
        for column in ("split", "expectation", "column", "rows"):
            table.add_column(column, overflow="fold")
        for split, e in failed:
            table.add_row(split, e["expected"], e["column"], str(e["unexpected_count"]))
        console.print(table)
    for message in checked.first_rejections:
        console.print(f"  set aside: {message}", highlight=False, soft_wrap=True)
    console.print(
        f"{checked.rows_quarantined} of {checked.rows_read} rows set aside: {checked.quarantine_path}\n"
        f"Data Docs: {checked.data_docs}\nSummary (JSON): {checked.summary_path}",
        highlight=False,
        soft_wrap=True,
    )


def print_run_plan(console: Console, plan) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="run plan", show_header=False)
    table.add_column(overflow="fold")
    table.add_column(no_wrap=True)  # the time estimate names a folder
    for name, value in (
        ("rows (train / validation / test)", f"{plan.train_rows} / {plan.validation_rows} / {plan.eval_rows}"),
        ("tokens (train / validation / test)", f"{plan.train_tokens} / {plan.validation_tokens} / {plan.eval_tokens}"),
        ("trained tokens (carry the loss)", str(plan.train_trained_tokens)),
        ("longest example", f"{plan.longest_example_tokens} tokens"),
        ("examples per step", str(plan.examples_per_step)),
        ("steps per epoch", str(plan.steps_per_epoch)),
        ("steps", f"{plan.steps} ({plan.epochs:.2f} epochs)"),
        ("device", f"{plan.environment.device}, {plan.environment.precision}"),
        (
            "memory estimate",
            f"{plan.environment.estimate_gib:.2f} GiB"
            + (f" of {plan.environment.free_gib:.1f} GiB free" if plan.environment.free_gib else "")
            + " ("
            + ", ".join(f"{k} {v:.2f}" for k, v in plan.environment.estimate.items())
            + ")",
        ),
        (
            "gradient checkpointing",
            {True: "on", False: "off", "offload": "on, offloaded to CPU memory"}[
                plan.environment.gradient_checkpointing
            ],
        ),
        ("time estimate", _time_estimate(plan)),
    ):
        table.add_row(name, escape(value))
    print_fitted(console, table)
    if plan.memory is not None:
        stages = Table(title=f"memory plan ({escape(plan.memory.gpu)})")
        for column in ("stage", "needs", "of", "available", "note"):
            stages.add_column(column, overflow="fold")
        for stage in plan.memory.stages:
            available = "unknown" if stage.available_gib is None else f"{stage.available_gib:.1f} GiB"
            stages.add_row(stage.stage, f"{stage.need_gib:.2f} GiB", stage.resource, available, escape(stage.note))
        console.print(stages)
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def _time_estimate(plan) -> str:
    estimate = plan.time_estimate
    if estimate is None:
        return (
            f"none yet: this base model has not trained on {plan.environment.device} in this workdir; "
            "the first run's speed sets it"
        )
    return (
        f"{estimate.seconds / 60:.1f} min for the steps (model loading not included), at the "
        f"{estimate.tokens_per_s:,.0f} tokens/s measured in {estimate.measured_in}"
    )


def print_checks(console: Console, checks, config: Path | None) -> None:
    """`tunepipe doctor`'s table: each check's status and detail."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"tunepipe doctor{f' for {escape(str(config))}' if config else ''}")
    for column in ("check", "status", "detail"):
        table.add_column(column, no_wrap=True)  # details name paths
    style = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}
    for check in checks:
        table.add_row(check.name, f"[{style[check.status]}]{check.status}[/]", escape(check.detail))
    print_fitted(console, table)


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
            table.add_column(column, overflow="fold")
        for name, state, seconds in states:
            table.add_row(name, state, f"{seconds:.1f}")
        self.console.print(table)

    def summary(self, summary) -> None:
        self.metrics(summary.eval, summary.gate, summary.validation)
        self.base_to_candidate(summary.eval, summary.gate)
        self.checks(summary.gate)
        self.where(summary)

    def where(self, summary) -> None:
        """Where the run's outputs are: GGUF, merged model, adapter, report, Data Docs, MLflow run, Ollama."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="tunepipe run", show_header=False)
        table.add_column(overflow="fold")
        table.add_column(no_wrap=True)  # paths and ids
        parity = ", ".join(
            f"{g.gguf_type} exact {g.scores.get('exact_match', 0):.2f} stop {g.scores.get('stop_rate', 0):.2f}"
            for g in summary.parity.ggufs
        )
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
            table.add_row(name, escape(value))
        print_fitted(self.console, table)
        self.console.print(
            f"Browse runs: mlflow ui --backend-store-uri {summary.mlflow_tracking_uri}   "
            "Flow runs: prefect server start (then open http://127.0.0.1:4200)",
            highlight=False,
            soft_wrap=True,
        )

    def base_to_candidate(self, report, decision) -> None:
        """What fine-tuning changed, and one test example answered by both: the base's and the candidate's."""
        from rich.markup import escape

        from tunepipe.tasks.evaluate.report import base_to_candidate

        changes = base_to_candidate(report, [check.metric for check in decision.checks])
        self.console.print(
            f"[bold]base → candidate[/] on {report.n_samples} {report.split} examples: " + ", ".join(changes),
            highlight=False,
            soft_wrap=True,
        )
        first = report.samples_path.read_text(encoding="utf-8").partition("\n")[0]
        if first:
            sample = json.loads(first)
            for who in ("base", "candidate"):
                answer = " ".join(sample[who]["answer"].split())
                answer = answer if len(answer) <= 160 else answer[:160] + " ..."
                self.console.print(
                    f"  {who:>9} answered {report.split} {sample['source']}: {escape(answer)}",
                    highlight=False,
                    soft_wrap=True,
                )

    def checks(self, decision) -> None:
        """Each gate rule in words: the differences to base and champion with their intervals and n."""
        from rich.markup import escape

        for check in decision.checks:
            mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
            self.console.print(f"  {mark} {escape(check.reason)}", highlight=False, soft_wrap=True)

    def gate(self, error) -> None:
        from rich.markup import escape

        self.metrics(error.eval, error.decision, error.validation)
        self.base_to_candidate(error.eval, error.decision)
        self.console.print(
            f"[bold yellow]not promoted:[/] the evaluation gate failed on the test split (retrain "
            f"loop: {error.outcome}); nothing was exported or registered and the champion is unchanged."
        )
        for reason in error.decision.reasons:
            self.console.print(f"  [red]-[/] {escape(reason)}", soft_wrap=True)
        self.console.print(
            f"report: {error.report.path}   MLflow run: {error.mlflow_run_id}", highlight=False, soft_wrap=True
        )

    def metrics(self, report, decision, validation=None) -> None:
        """Headline metrics of base / champion / candidate on `report`'s split, beside their `validation` scores
        when given, plus every metric a gate rule checked."""
        from rich.table import Table

        from tunepipe.tasks.evaluate.gate import RETENTION_CHECK
        from tunepipe.tasks.evaluate.report import label, models

        splits = [r for r in (validation, report) if r is not None]
        gated = {check.metric for check in decision.checks} - {RETENTION_CHECK, "regressions"}
        names = sorted({n for r in splits for s in models(r) for n in s.metrics if "." not in n} | gated)

        def table(shown: list) -> Table:
            """Each model's scores on each split in `shown`, side by side."""
            title = ", ".join(f"{r.split}: {r.n_samples} examples" for r in shown)
            columns = [(r, scores) for scores in models(report) for r in shown]
            metrics = Table(title=f"metrics ({title})")
            metrics.add_column("metric", no_wrap=True)
            for r, scores in columns:
                metrics.add_column(f"{label(scores)} {r.split}", justify="right", overflow="fold")
            for name in names:
                values = [
                    next((s.metrics.get(name) for s in models(r) if s.name == scores.name), None)
                    for r, scores in columns
                ]
                metrics.add_row(
                    name + (" *" if name in gated else ""), *("-" if v is None else f"{v:.3f}" for v in values)
                )
            return metrics

        both = table(splits)
        # A narrow terminal gets one table per split rather than headers broken inside their words.
        for shown in [both] if fits(self.console, both) else [table([r]) for r in splits]:
            self.console.print(shown)
        self.console.print(f"* checked by the gate (on {report.split})")
        if (kept := report.retention) is not None:
            gated_retention = " *" if RETENTION_CHECK in {c.metric for c in decision.checks} else ""
            self.console.print(
                f"retention on {kept.n_prompts} general prompts: loss on the base's answers base "
                f"{kept.base_loss:.3f} → candidate {kept.candidate_loss:.3f} ({kept.loss_increase:+.3f} "
                f"nats per token){gated_retention}",
                highlight=False,
            )


def stage_states(flow_run_id) -> list[tuple[str, str, float]]:
    """(task name, final state name, seconds) for every task run of a flow run, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=100,
        )
    # Task run names carry a random suffix ("train-3b9"); the stage is the part before it.
    return [(r.name.rsplit("-", 1)[0], r.state_name or "?", r.total_run_time.total_seconds()) for r in runs]
