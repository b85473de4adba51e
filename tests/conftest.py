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
    from tunepipe.tasks.demo.tiny_model import CACHE_NAME, build_tiny_model
    from tunepipe.tasks.integrations.llama_cpp import cache_root

    return build_tiny_model(cache_root() / CACHE_NAME)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained tiny model as an f16 GGUF, converted once per session."""
    from tunepipe.tasks.export.task import convert

    return convert(tiny_model, tmp_path_factory.mktemp("tiny-gguf") / "model-f16.gguf", "f16")


def gguf_file(path: Path):
    """An f16 GGUF file as the export stage describes it."""
    from tunepipe.tasks.export.results import GgufFile
    from tunepipe.tasks.runtime.caching import file_digest

    return GgufFile(type="f16", path=path, bytes=path.stat().st_size, sha256=file_digest(path).split(":")[1])


@pytest.fixture(scope="session")
def obedient_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny Qwen3 rewired to answer `{}` and stop: a model that passes the smoke test, without training.

    Its layers add nothing (zero output projections), so the next token depends on the last one only, and the
    untied head maps the assistant header's final newline to the first token of `{}`, each of its tokens to
    the next, and the last to <|im_end|>.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.export.task import convert

    out = tmp_path_factory.mktemp("obedient")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=False)
    chain = [
        tokenizer.convert_tokens_to_ids("Ċ"),
        *tokenizer("{}", add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    assert len(set(chain)) == len(chain)  # a token followed by two others could not be told apart
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        head = torch.zeros_like(embeddings)
        for previous, following in zip(chain, chain[1:]):
            head[following] = embeddings[previous] * 10
        model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    return gguf_file(convert(out / "hf", out / "model-f16.gguf", "f16"))


def _real_model(name: str):
    """A packaged real model's transformers folder, built from its GGUF once (shared cache) and reused; a GGUF
    without a chat template gets the one its package entry names."""
    import warnings

    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.model.packaged import PACKAGED, packaged_gguf
    from tunepipe.tasks.runtime.config import ModelConfig

    with warnings.catch_warnings():  # its quantization warning has a test of its own
        warnings.simplefilter("ignore")
        return resolve_base_model(
            ModelConfig(base=str(packaged_gguf(name)), chat_template=PACKAGED[name].chat_template)
        )


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Llama architecture, byte-level BPE, ChatML) as a BaseModelRef from its Q4_1 GGUF."""
    return _real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M base (SentencePiece, no chat template, no system role) with the Gemma turn format."""
    return _real_model("gemma3-270m")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tunepipe.tasks.demo.data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Prefect API (temporary database) and result store for every flow run in the session."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}),
        prefect_test_harness(server_startup_timeout=120),
    ):
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


@pytest.fixture(scope="session")
def fast_config(tiny_model: Path, demo_data: tuple[Path, Path]):
    """A function: root folder -> the demo config as a dict, on the tiny model, trained and evaluated in seconds,
    with its own workdir and MLflow store under `root`, and an Ollama host where nothing answers."""
    import yaml

    def make(root: Path) -> dict:
        config = yaml.safe_load(Path("configs/demo.yaml").read_text())
        train, eval_ = demo_data
        config.update(workdir=str(root / "runs"))
        config["data"].update(train=str(train), eval=str(eval_))
        config["model"]["base"] = str(tiny_model)
        # LoRA: the common case (the finetune flow's own test trains every weight, as the demo does)
        config["train"].update(mode="lora", max_steps=2, batch_size=2, logging_steps=1)
        config["eval"] = {"max_samples": 2, "max_new_tokens": 8, "retention": {"builtin": 2, "max_new_tokens": 8}}
        # A gate every model passes, one attempt: these runs test ingestion, flows and serving, not quality
        # (the gate and the retrain loop have their own tests). The tiny model says no word retention could
        # score: it is measured, not gated.
        config["gate"] = {"rules": {"stop_rate": {"min": 0.0}}, "retention": None}
        config["retrain"] = {"max_attempts": 1}
        config["tracking"] = {
            "uri": f"sqlite:///{root}/mlflow.db",
            "experiment": "fast",
            "artifact_location": str(root / "mlartifacts"),
        }
        config["ollama"]["host"] = "http://127.0.0.1:9"
        return config

    return make
