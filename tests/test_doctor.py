"""`tunepipe doctor`: one screen on the machine, exit 1 when the config needs something missing, nothing leaked."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tunepipe.deployments.cli import main

OLLAMA_VERSION = "0.12.6"


class OllamaVersionHandler(BaseHTTPRequestHandler):
    """Ollama's GET /api/version (docs/api.md), the only endpoint the doctor calls."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        found = self.path == "/api/version"
        body = json.dumps({"version": OLLAMA_VERSION} if found else {"error": "not found"}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def ollama_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OllamaVersionHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def wide_offline_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per check, so the assertions can read rows
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def write_config(root: Path, tiny_model: Path, demo_data: tuple[Path, Path], **sections) -> Path:
    config = {
        "name": "doctor",
        "data": {"train": str(demo_data[0]), "eval": str(demo_data[1])},
        "model": {"base": str(tiny_model)},
        "ollama": {"model_name": "doctor"},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
    }
    for section, fields in sections.items():
        config.setdefault(section, {}).update(fields)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows(output: str) -> dict[str, str]:
    """check name -> the rest of its table row."""
    table = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 3 and cells[0]:
            table[cells[0]] = f"{cells[1]} {cells[2]}"
    return table


def test_ready_config_reports_every_part_and_exits_zero(tmp_path, tiny_model, demo_data, ollama_url, capsys):
    config = write_config(tmp_path, tiny_model, demo_data, ollama={"host": ollama_url})
    assert main(["doctor", str(config)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    for package in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "prefect",
        "mlflow",
        "great_expectations",
        "llama-cpp-python",
    ):
        assert table[package].startswith("ok "), package
    assert table["Ollama"] == f"ok {ollama_url}: version {OLLAMA_VERSION}"
    assert table["Hugging Face hub"].startswith("info offline (HF_HUB_OFFLINE=1)")
    assert table["model.base"].startswith("ok ") and table["llama.cpp converter"].startswith("ok ")
    assert table["Go template harness"].startswith("ok ")
    assert table["MLflow tracking"].startswith("ok sqlite:///")
    assert {"python", "CUDA", "unsloth", "bitsandbytes", "Prefect API", "data.train", "data.eval"} <= table.keys()
    assert f"ready to run {config}" in out


def test_config_needing_cuda_on_a_cpu_machine_exits_nonzero_with_the_reason(tmp_path, tiny_model, demo_data, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = write_config(
        tmp_path, tiny_model, demo_data, train={"backend": "unsloth"}, ollama={"host": "http://127.0.0.1:9"}
    )
    assert main(["doctor", str(config)]) == 1
    out = capsys.readouterr().out
    table = rows(out)
    assert table["CUDA"].startswith("fail no CUDA GPU") and "the config sets train.backend: unsloth" in table["CUDA"]
    assert table["unsloth"] == "fail not usable: needs CUDA"
    assert table["Ollama"].startswith("warn http://127.0.0.1:9: not reachable")  # optional: registration waits
    assert "missing: CUDA, unsloth" in out


def test_unreachable_tracking_server_fails_without_showing_its_password(tmp_path, tiny_model, demo_data, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(
        tmp_path,
        tiny_model,
        demo_data,
        tracking={"uri": f"http://ops:s3cr3t-pw@127.0.0.1:{port}"},
        ollama={"host": "http://127.0.0.1:9"},
    )
    assert main(["doctor", str(config)]) == 1
    out = capsys.readouterr().out
    assert rows(out)["MLflow tracking"].startswith(f"fail http://ops:***@127.0.0.1:{port}: not reachable")
    assert "s3cr3t-pw" not in out


def test_missing_go_fails_with_the_install_command(monkeypatch, tmp_path):
    import shutil

    from tunepipe.deployments.doctor import _go_template

    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))  # no harness built there
    monkeypatch.setattr(shutil, "which", lambda name: None)
    (check,) = _go_template()
    assert check.status == "fail" and "apt-get install golang-go" in check.detail
