"""The base-model preflight: every way `model.base` can be unusable gives an error naming it, what failed and the
fix, before any stage runs. The hub is simulated on loopback (it answers like huggingface.co: 401 RepoNotFound,
401/403 GatedRepo, 404 RevisionNotFound) and through a closed port; nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tunepipe.tasks.model.base import BaseModelError, resolve_base_model
from tunepipe.tasks.runtime.config import ModelConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GRANTED_TOKEN = "hf_grantedgrantedgrantedgrantedgrant"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
MODEL_FILES = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}"}
REPOS = {
    "acme/chat": {**MODEL_FILES, "tokenizer_config.json": json.dumps({"chat_template": CHATML})},
    "acme/base": {**MODEL_FILES, "tokenizer_config.json": json.dumps({"eos_token": "</s>"})},
    "acme/gated": {**MODEL_FILES, "chat_template.jinja": CHATML},
    "acme/gguf-only": {"model-Q4_K_M.gguf": "gguf", "README.md": "# a GGUF"},
}


class FakeHub(ThreadingHTTPServer):
    """The two hub endpoints from_pretrained and model_info use: /api/models/… and /…/resolve/…."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.unavailable = 0  # answer this many more model_info requests with 503, as a hub having a bad minute
        self.info_requests = 0


class FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        info = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/?]+))?(?:\?.*)?", self.path)
        if info:
            self.model_info(info["repo"], info["rev"] or "main")
        else:
            self.resolve(with_body=True)

    def do_HEAD(self) -> None:
        self.resolve(with_body=False)

    def model_info(self, repo: str, revision: str) -> None:
        self.server.info_requests += 1
        if self.server.unavailable:
            self.server.unavailable -= 1
            return self.error(503, "ServiceUnavailable", "Service Unavailable")
        if repo not in REPOS:  # the hub answers 401, not 404, to anonymous requests for missing repos
            return self.error(401, "RepoNotFound", "Repository not found")
        if revision not in ("main", COMMIT):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        body = {
            "id": repo,
            "sha": COMMIT,
            "private": False,
            "gated": "manual" if repo == "acme/gated" else False,
            "siblings": [{"rfilename": name} for name in REPOS[repo]],
        }
        self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, with_body=True)

    def resolve(self, with_body: bool) -> None:
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.path)
        if not match or match["repo"] not in REPOS or match["file"] not in REPOS[match["repo"]]:
            return self.error(404, "EntryNotFound", "Entry not found")
        if match["repo"] == "acme/gated":
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token != GRANTED_TOKEN:
                return self.error(
                    403 if token else 401,
                    "GatedRepo",
                    "Access to model acme/gated is restricted. You must have access to it.",
                )
        body = REPOS[match["repo"]][match["file"]].encode()
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self.reply(200, body, headers, with_body)

    def error(self, status: int, code: str, message: str) -> None:
        self.reply(
            status,
            json.dumps({"error": message}).encode(),
            {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            with_body=self.command != "HEAD",
        )

    def reply(self, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty HF cache, no token, online; the hub endpoint is set by each test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return cache


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT=url does when set before huggingface_hub is imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def fake_hub(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    use_endpoint(monkeypatch, hub.url)
    yield hub
    hub.shutdown()
    hub.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_for(base: str, **fields) -> str:
    with pytest.raises(BaseModelError) as caught:
        resolve_base_model(ModelConfig(base=base, **fields))
    return str(caught.value)


def cache_snapshot(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """The HF cache's layout for one commit of `repo`: refs/main → snapshots/<commit>/<files>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


# --- The hub ---------------------------------------------------------------------------------------------------


def resolve_with_retries(base: str):
    """The finetune flow's hub resolution: the task, with three tries and no waiting."""
    from prefect import flow

    from tunepipe.tasks.model.base import resolve_base
    from tunepipe.tasks.runtime.config import RetryConfig
    from tunepipe.tasks.runtime.retries import network_retries

    retrying = network_retries(RetryConfig(attempts=3, backoff_s=0))

    @flow
    def resolve():
        return resolve_base.with_options(**retrying)(ModelConfig(base=base))

    return resolve(return_state=True)


@pytest.mark.slow
def test_a_hub_that_fails_its_first_answers_is_retried_until_it_resolves(fake_hub, prefect_server):
    fake_hub.unavailable = 2
    assert resolve_with_retries("acme/chat").result().fingerprint == COMMIT


@pytest.mark.slow
def test_a_definite_hub_answer_is_not_retried(fake_hub, prefect_server):
    state = resolve_with_retries("acme/missing")
    assert (state.is_failed(), fake_hub.info_requests) == (True, 1)


def test_hub_model_resolves_to_its_commit(fake_hub):
    ref = resolve_base_model(ModelConfig(base="acme/chat"))
    assert (ref.name_or_path, ref.fingerprint) == ("acme/chat", COMMIT)


def test_unreachable_hub_names_the_model_the_endpoint_and_the_ways_out(hub_env, monkeypatch):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    message = error_for("acme/chat")
    assert "model.base 'acme/chat': cannot reach the Hugging Face hub at http://127.0.0.1:" in message
    assert "Connection refused" in message
    assert "not in the HF cache" in message and "HF_HUB_OFFLINE=1" in message and "local folder" in message


def test_unreachable_hub_points_at_the_cached_copy_when_there_is_one(hub_env, monkeypatch):
    cache_snapshot(hub_env, "acme/chat", REPOS["acme/chat"])
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert f"The HF cache holds it (commit {COMMIT}): set HF_HUB_OFFLINE=1" in error_for("acme/chat")
    # A pinned commit the cache holds needs no hub at all.
    assert resolve_base_model(ModelConfig(base="acme/chat", revision=COMMIT)).fingerprint == COMMIT


def test_unknown_model_id(fake_hub):
    message = error_for("acme/no-such-model")
    assert "model.base 'acme/no-such-model': no model with that id on the hub" in message
    assert "spelling" in message and "hf auth login" in message


def test_gated_model_without_a_token_says_how_to_log_in(fake_hub):
    message = error_for("acme/gated")
    assert "model.base 'acme/gated' is gated" in message and "no token is set" in message
    assert f"{fake_hub.url}/acme/gated" in message and "hf auth login" in message and "HF_TOKEN" in message


def test_gated_model_with_a_token_that_has_no_access_yet(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_notgrantednotgrantednotgranted")
    message = error_for("acme/gated")
    assert "has no access to it yet" in message and "accept its license" in message
    assert "hf_notgranted" not in message


def test_gated_model_with_a_granted_token_resolves(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GRANTED_TOKEN)
    assert resolve_base_model(ModelConfig(base="acme/gated")).fingerprint == COMMIT


def test_revision_not_found(fake_hub):
    message = error_for("acme/chat", revision="v9")
    assert "model.revision 'v9' does not exist for model.base 'acme/chat'" in message
    assert "/acme/chat/tree/main" in message and "remove model.revision" in message


def test_hub_model_without_chat_template_asks_for_one(fake_hub):
    message = error_for("acme/base")
    assert "model.base 'acme/base' has no chat template" in message and "model.chat_template" in message
    assert resolve_base_model(ModelConfig(base="acme/base", chat_template=CHATML)).fingerprint == COMMIT


def test_gguf_only_repo_is_not_a_trainable_model(fake_hub):
    message = error_for("acme/gguf-only")
    assert "the hub repo acme/gguf-only@main has no config.json; it holds README.md, model-Q4_K_M.gguf" in message


# --- Offline (HF_HUB_OFFLINE=1) --------------------------------------------------------------------------------


def test_offline_without_a_cached_copy(hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = error_for("acme/chat", revision="v1")
    assert "HF_HUB_OFFLINE=1 is set and the HF cache" in message
    assert "`hf download acme/chat --revision v1`" in message


def test_offline_uses_the_cached_commit_and_checks_its_files(hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache_snapshot(hub_env, "acme/chat", REPOS["acme/chat"])
    assert resolve_base_model(ModelConfig(base="acme/chat")).fingerprint == COMMIT
    cache_snapshot(hub_env, "acme/partial", {"config.json": "{}"})
    message = error_for("acme/partial")
    assert "the HF cache's copy" in message and "has no model weights" in message and "hf download" in message


# --- Local folders ---------------------------------------------------------------------------------------------


def model_folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"config.json": "{}", "tokenizer.json": "{}", "chat_template.jinja": CHATML},
            "has no model weights (*.safetensors or pytorch_model*.bin)",
        ),
        ({"config.json": "{}", "model.safetensors": "w", "chat_template.jinja": CHATML}, "has no tokenizer"),
        (
            {"adapter_config.json": "{}", "adapter_model.safetensors": "w"},
            "has no config.json (it is a LoRA adapter: set model.base to its base model)",
        ),
        ({**MODEL_FILES, "tokenizer_config.json": "{}"}, "has no chat template"),
    ],
)
def test_local_folder_missing_a_part(tmp_path: Path, files: dict[str, str], expected: str):
    folder = model_folder(tmp_path / "model", files)
    message = error_for(str(folder))
    assert message.startswith(f"model.base {str(folder)!r}") and expected in message


def test_missing_local_folder(tmp_path: Path):
    message = error_for(str(tmp_path / "models" / "mine"))
    assert "no such folder" in message and "not a hub id" in message


def test_complete_local_folder_resolves_to_a_content_hash(tmp_path: Path):
    folder = model_folder(tmp_path / "model", {**MODEL_FILES, "chat_template.jinja": CHATML})
    first = resolve_base_model(ModelConfig(base=str(folder))).fingerprint
    (folder / "model.safetensors").write_text("other weights")
    assert resolve_base_model(ModelConfig(base=str(folder))).fingerprint != first


# --- What the user sees ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_prints_the_model_error_without_traceback_before_any_stage(tmp_path: Path):
    config = {
        "name": "x",
        "data": {"train": str(tmp_path / "train.jsonl")},
        "model": {"base": "acme/chat"},
        "ollama": {"model_name": "x"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(Path.cwd()),
    }
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tunepipe.deployments.cli import main; sys.exit(main())",
            "run",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "model.base 'acme/chat': cannot reach the Hugging Face hub" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "stages" not in done.stdout
    assert "temporary server" not in done.stderr  # started with the run, stopped without a word


@pytest.mark.slow
def test_flow_fails_before_any_stage_and_the_cli_prints_no_empty_table(
    prefect_server, tmp_path: Path, capfd, monkeypatch
):
    from tunepipe.deployments import cli
    from tunepipe.tasks.runtime.config import load_config

    # The CLI checks the base model before the flow; the flow's own check is what a model that changed
    # in between (or a hub that failed in between) meets.
    monkeypatch.setattr(cli, "usable_base_model", lambda cfg: True)

    folder = model_folder(tmp_path / "model", {"config.json": "{}", "tokenizer.json": "{}"})
    config = {
        "name": "x",
        "workdir": str(tmp_path / "runs"),
        "data": {"train": str(tmp_path / "train.jsonl")},
        "model": {"base": str(folder)},
        "ollama": {"model_name": "x"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.run_finetune(load_config(path), unserved_status=4) == 1
    out = " ".join(capfd.readouterr().out.split())  # rich wraps lines at the terminal width
    # The one stage that ran is the base model's resolution (a task, so a hub hiccup is retried).
    assert "failed:" in out and "has no model weights" in out and "load_data" not in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
