"""Shared fixtures: the tiny model (built once, then cached), demo data, and a real Prefect test server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tasks.llama_cpp_tools import cache_root
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(cache_root() / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained tiny model as an f16 GGUF, converted once per session."""
    from tasks.export import convert

    return convert(tiny_model, tmp_path_factory.mktemp("tiny-gguf") / "model-f16.gguf", "f16")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tasks.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Prefect API (temporary database) and result store for every flow run in the session."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}), \
            prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fake_ollama(tmp_path: Path) -> Iterator:
    """A strict stand-in for Ollama's HTTP API (tests/fake_ollama.py), on a free local port."""
    import threading

    from fake_ollama import FakeOllama

    server = FakeOllama(tmp_path / "ollama-blobs")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.close()


def closed_port() -> int:
    """A local port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
