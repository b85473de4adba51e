"""Every table the CLI prints, rendered in an 80-column terminal with full-length ids and long paths: no id or
path is cut or split across lines, no cell is cut short, and a wide terminal still gets the tables."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from tunepipe.deployments.doctor import Check
from tunepipe.deployments.output import Report, print_checks, print_data_report, print_run_plan
from tunepipe.deployments.status import RagStatus, RunLine, Status, show_status
from tunepipe.tasks.integrations.model_registry import ChampionRef

LONG = Path("/home/ml-engineer/projects/customer-support-assistant/runs/2026-12-07-nightly-retrain")


def console(width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)


def printed(screen: Console) -> str:
    text = screen.file.getvalue()
    assert "…" not in text  # nothing cut short
    for line in text.splitlines():  # a table's lines fit; the lines of a block are the terminal's to wrap
        assert not any(border in line for border in "│┃┏━┡└") or len(line) <= screen.width, line
    return text


def run_line(started: str) -> RunLine:
    return RunLine(
        run_id=uuid.uuid4().hex,
        name=f"finetune-support-assistant-{uuid.uuid4().hex[:8]}",
        status="FINISHED",
        started=started,
        gate="passed",
        ollama="unreachable",
        dataset=uuid.uuid4().hex[:12],
    )


@pytest.mark.parametrize("width", [80, 200])
def test_status_prints_every_run_id_name_and_date_whole(width):
    runs = [run_line(f"2026-12-0{day} 03:15:4{day}") for day in range(1, 6)]
    pending = runs[:2]
    champion = ChampionRef(
        name="support-assistant",
        version="7",
        run_id=uuid.uuid4().hex,
        source=str(LONG / "export" / "merged"),
        tags={"ollama.tag": "support-assistant:7", "dataset.fingerprint": uuid.uuid4().hex},
    )
    rag = RagStatus(
        state_dir=LONG / "rag-state",
        snapshot_version=3,
        examples_ingested=120,
        examples_untrained=12,
        watermark={"created_at": "2026-12-07T03:00:00Z", "id": 4711},
        new_rows=5,
        error=None,
    )
    screen = console(width)
    show_status(
        screen, "support-assistant", Status(champion=champion, last_runs=runs, pending_registrations=pending, rag=rag)
    )
    out = printed(screen)
    for line in runs:
        assert all(value in out for value in (line.run_id, line.name, line.started, line.dataset))
    assert champion.run_id in out and str(LONG / "rag-state") in out
    pending_part = out.split("pending registrations")[1]
    assert all(line.run_id in pending_part for line in pending)
    if width == 200:  # room for one line per run: the table itself
        assert "┃ run_id" in out
    else:
        assert "┃" not in out


def test_status_with_no_runs_says_so():
    screen = console()
    show_status(screen, "support-assistant", Status(champion=None, last_runs=[], pending_registrations=[], rag=None))
    assert "none promoted yet" in printed(screen)


def test_check_prints_whole_paths_in_the_data_report_and_the_run_plan():
    files = [
        SimpleNamespace(
            source=str(LONG / "data" / f"support_answers_{split}_2026-11.jsonl"),
            rows_read=1200,
            kept_train=1000,
            kept_validation=100,
            kept_eval=90,
            quarantined=10,
        )
        for split in ("export", "chat-log")
    ]
    failed = {
        "success": False,
        "expected": "expect_column_value_lengths_to_be_between",
        "column": "messages",
        "unexpected_count": 3,
    }
    checked = SimpleNamespace(
        files=files,
        train=SimpleNamespace(expectations=[failed]),
        validation=SimpleNamespace(expectations=[]),
        eval=SimpleNamespace(expectations=[]),
        first_rejections=[f"{files[0].source}:17: 386 tokens > 128"],
        rows_quarantined=20,
        rows_read=2400,
        quarantine_path=LONG / "data" / "quarantine.jsonl",
        data_docs=LONG / "data" / "data_docs" / "index.html",
        summary_path=LONG / "data" / "summary.json",
    )
    measured_in = LONG / "train" / uuid.uuid4().hex
    environment = SimpleNamespace(
        device="cuda x1",
        precision="bf16",
        free_gib=70.5,
        estimate_gib=3.25,
        estimate={"weights": 1.0, "activations": 2.25},
        gradient_checkpointing="offload",
    )
    memory = SimpleNamespace(
        gpu="NVIDIA H100 80GB HBM3: 70.5 GiB free",
        stages=[
            SimpleNamespace(
                stage="evaluations during training",
                need_gib=3.5,
                resource="GPU memory",
                available_gib=70.5,
                note="batch 8, sized down from 32 when memory runs short",
            )
        ],
    )
    plan = SimpleNamespace(
        train_rows=2000,
        validation_rows=200,
        eval_rows=180,
        train_tokens=812345,
        validation_tokens=81234,
        eval_tokens=73456,
        train_trained_tokens=412345,
        longest_example_tokens=2048,
        examples_per_step=16,
        steps_per_epoch=125,
        steps=250,
        epochs=2.0,
        environment=environment,
        time_estimate=SimpleNamespace(seconds=600, tokens_per_s=41234.5, measured_in=measured_in),
        memory=memory,
        warnings=[f"train.max_steps=400 goes over {files[0].source} 133 times"],
    )
    screen = console()
    print_data_report(screen, checked)
    print_run_plan(screen, plan)
    out = printed(screen)
    for path in (
        *[f.source for f in files],
        checked.quarantine_path,
        checked.data_docs,
        checked.summary_path,
        measured_in,
    ):
        assert str(path) in out
    assert "expect_column_value_lengths_to_be_between" in out and "memory runs short" in out


def test_doctor_prints_whole_paths():
    home = LONG / "prefect-home-of-the-team"
    checks = [
        Check("python", "ok", "3.11.9 (/usr/local/bin/python3.11)"),
        Check("Prefect API", "info", f"none set: each run starts a temporary server (PREFECT_HOME {home})"),
        Check("MLflow tracking", "fail", f"sqlite:///{LONG}/mlflow.db: {LONG} is not writable"),
    ]
    screen = console()
    print_checks(screen, checks, LONG / "configs" / "support-assistant.yaml")
    out = printed(screen)
    assert str(home) in out and f"sqlite:///{LONG}/mlflow.db" in out and str(LONG / "configs") in out


def test_a_runs_report_prints_whole_paths_and_ids(monkeypatch):
    from tunepipe.deployments import output
    from tunepipe.tasks.evaluate.gate import RETENTION_CHECK

    monkeypatch.setattr(
        output,
        "stage_states",
        lambda flow_run_id: [
            ("check_data", "Completed", 2.5),
            ("train", "Completed", 312.25),
            ("export_gguf", "Cached", 0.0),
        ],
    )

    mlflow_run_id = uuid.uuid4().hex
    summary = SimpleNamespace(
        gguf_path=LONG / "export" / "support-assistant-q4_k_m.gguf",
        parity=SimpleNamespace(ggufs=[SimpleNamespace(gguf_type="q4_k_m", scores={"exact_match": 0.9})]),
        exported=SimpleNamespace(merged_dir=LONG / "export" / "merged", adapter_dir=LONG / "train" / "adapter"),
        gate=SimpleNamespace(summary=lambda: "passed (3 rules)"),
        attempts=1,
        retrain_outcome="passed on attempt 1",
        report=SimpleNamespace(path=LONG / "report" / "report.md"),
        data_docs=LONG / "data" / "data_docs",
        mlflow_run_id=mlflow_run_id,
        mlflow_tracking_uri=f"sqlite:///{LONG}/mlflow.db",
        serving=SimpleNamespace(
            registration=SimpleNamespace(message="Ollama: support-assistant:7 registered"),
            served=True,
            promotion=SimpleNamespace(version="7"),
        ),
    )
    scores = [
        SimpleNamespace(
            name=name, version=version, metrics={"exact_match": 0.5, "field_accuracy": 0.75, "eval_loss": 1.25}
        )
        for name, version in (("base", None), ("champion", "12"), ("candidate", None))
    ]
    test = SimpleNamespace(
        split="test", n_samples=180, base=scores[0], champion=scores[1], candidate=scores[2], retention=None
    )
    validation = SimpleNamespace(**{**vars(test), "split": "validation", "n_samples": 200})
    decision = SimpleNamespace(checks=[SimpleNamespace(metric="exact_match"), SimpleNamespace(metric=RETENTION_CHECK)])
    report = Report(flow_run_id=None)
    report.console = console()
    report.stages()
    report.metrics(test, decision, validation)
    report.where(summary)
    out = printed(report.console)
    for value in (
        summary.gguf_path,
        summary.exported.merged_dir,
        summary.exported.adapter_dir,
        summary.report.path,
        summary.data_docs,
        mlflow_run_id,
        summary.mlflow_tracking_uri,
    ):
        assert str(value) in out
    assert "export_gguf" in out and "field_accuracy *" not in out and "exact_match *" in out
