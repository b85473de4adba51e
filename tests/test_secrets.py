"""Secrets never leak: a real run with an HF token, a tracking URI carrying a token and an Ollama URL carrying a
password, then a search of everything the run wrote (MLflow store and artifacts, workdir, Prefect's database,
logs and results) and everything it printed."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from test_finetune_flow import fixture_config_path  # noqa: F401  (registers the flow tests' `config_path` fixture)

from tunepipe.tasks.runtime.redact import RedactingFilter, redact

HF_TOKEN = "hf_" + secrets.token_hex(17)
URL_TOKEN = "tok-" + secrets.token_hex(8)
PASSWORD = "pw-" + secrets.token_hex(8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("mysql+pymysql://u:p%40ss@db/x", "mysql+pymysql://u:***@db/x"),
        ("https://mlflow.example.com/?token=abc123&x=1", "https://mlflow.example.com/?token=***&x=1"),
        ("s3://b/k?X-Amz-Signature=ff00&X-Amz-Credential=AKIA", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("host=db user=me password=hunter2", "host=db user=me password=***"),
        ('{"api_key": "sk-123456"}', '{"api_key": "***"}'),
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("token hf_abcdefghijklmnopqrstuvwxyz0123", "token hf_***"),
        # not secrets: a user name alone, token counts, ordinary paths
        ("postgresql://mlflow@db/x", "postgresql://mlflow@db/x"),
        ("max_new_tokens=128, train_tokens: 4000", "max_new_tokens=128, train_tokens: 4000"),
        ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
    ],
)
def test_redact(text: str, expected: str):
    assert redact(text) == expected


def test_redact_masks_secret_environment_values_anywhere(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # too short to be a secret: left alone
    assert redact("auth failed for correct-horse-battery (false)") == "auth failed for *** (false)"


def test_log_filter_redacts_message_arguments_and_traceback():
    try:
        raise ConnectionError("cannot reach postgresql://u:hunter2@db/x")
    except ConnectionError:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "connecting to %s", ("http://a:b4cdef@h",), sys.exc_info()
        )
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "hunter2" not in text and "b4cdef" not in text and "u:***@db" in text and "a:***@h" in text


@pytest.mark.slow
def test_a_real_run_leaks_no_secret_anywhere(
    prefect_server,
    config_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

    from tunepipe.deployments.cli import run_finetune
    from tunepipe.tasks.runtime.config import load_config

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    out = tmp_path / "out"  # everything the run writes; the config (which holds the secrets) stays outside
    config = yaml.safe_load(config_path.read_text())
    config.update(workdir=str(out / "runs"))
    config["train"].update(max_steps=2)
    config["eval"] = {"max_samples": 2, "max_new_tokens": 8, "retention": {"builtin": 0}}
    # a 2-step model must get through the whole flow
    config["gate"] = {"rules": {"stop_rate": {"min": 0.0}}, "retention": None}
    tracking_uri = f"sqlite:///{out}/mlflow.db?access_token={URL_TOKEN}"
    config["tracking"] = {"uri": tracking_uri, "experiment": "secrets", "artifact_location": str(out / "artifacts")}
    config["ollama"]["host"] = f"http://ops:{PASSWORD}@127.0.0.1:9"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    everything = [HF_TOKEN, URL_TOKEN, PASSWORD]

    assert run_finetune(load_config(path), unserved_status=0) == 0  # no Ollama here: unserved is the expected end
    printed = capfd.readouterr()
    assert "Browse runs: mlflow ui" in printed.out
    assert not [s for s in everything if s in printed.out + printed.err], "the CLI printed a secret"

    # The secrets were really there to leak: the run logged both fields, masked.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the pipeline run, not its attempt
    assert run.data.params["tracking.uri"].endswith("mlflow.db?access_token=***")
    assert run.data.params["ollama.host"] == "http://ops:***@127.0.0.1:9"

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(UUID(run.data.tags["prefect.flow_run_id"]))
        APILogWorker.drain_all(timeout=5)
        logs = prefect.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200, offset=0
        )
    log_text = "\n".join(log.message for log in logs)
    assert "ollama:" in log_text
    assert not [s for s in everything if s in log_text + str(flow_run.parameters) + str(flow_run.state.message)]

    prefect_db = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    prefect_db = getattr(prefect_db, "get_secret_value", lambda: prefect_db)()
    places = [out, PREFECT_RESULTS_LOCAL_STORAGE_PATH.value(), Path(prefect_db.split(":///", 1)[1]).parent]
    files = [file for place in places for file in Path(place).rglob("*") if file.is_file()]
    assert any(file.name == "resolved.json" for file in files) and any(file.suffix == ".gguf" for file in files)
    leaks = [(str(file), s) for file in files for s in everything if s.encode() in file.read_bytes()]
    assert not leaks
