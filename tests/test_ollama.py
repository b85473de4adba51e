"""tasks/ollama.py against a small local server that implements Ollama's documented HTTP API (docs/api.md),
since Ollama itself cannot be installed here, and against a real Ollama when one answers at $OLLAMA_HOST."""

import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.config import OllamaConfig
from tasks.ollama import (
    OllamaClient,
    OllamaConnectionError,
    OllamaError,
    modelfile_spec,
    ollama_host,
    ollama_template,
    register_model,
)
from tasks.tiny_model import CHATML_TEMPLATE

# Meta-Llama-3-8B-Instruct's chat template, as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without its tool branch: it adds a system prompt when a conversation has none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# --- A stand-in Ollama ---------------------------------------------------------------------------------------

BLOB_PATH = re.compile(r"/api/blobs/(?P<digest>.*)")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class FakeOllama(ThreadingHTTPServer):
    """Ollama's API as docs/api.md describes it, in memory; it remembers what it was asked."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeOllamaHandler)
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []  # "METHOD path", in order
        self.create_requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _full_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


class FakeOllamaHandler(BaseHTTPRequestHandler):
    server: FakeOllama
    protocol_version = "HTTP/1.1"  # like Ollama: streams go out chunked

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.calls.append(f"GET {self.path}")
        if self.path == "/api/version":
            self._json(200, {"version": "0.0.0-fake"})
        else:
            self._json(404, {"error": "404 page not found"})

    def do_HEAD(self) -> None:
        self.server.calls.append(f"HEAD {self.path}")
        blob = BLOB_PATH.fullmatch(self.path)
        self.send_response(200 if blob and blob["digest"] in self.server.blobs else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.server.calls.append(f"POST {self.path}")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if blob := BLOB_PATH.fullmatch(self.path):
            self._receive_blob(blob["digest"], body)
        elif self.path == "/api/create":
            self._create(json.loads(body))
        elif self.path == "/api/show":
            self._show(json.loads(body))
        else:
            self._json(404, {"error": "404 page not found"})

    def _receive_blob(self, digest: str, data: bytes) -> None:
        if not DIGEST.fullmatch(digest):
            return self._json(400, {"error": "invalid digest format"})
        if digest in self.server.blobs:
            return self._json(200, None)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            return self._json(400, {"error": f"digest mismatch, expected {digest!r}, got {actual!r}"})
        self.server.blobs[digest] = data
        self._json(201, None)

    def _create(self, request: dict[str, Any]) -> None:
        self.server.create_requests.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk({"status": "parsing GGUF"})
        for digest in request["files"].values():
            if digest not in self.server.blobs:
                # Ollama opens the blob after the stream has started: the failure comes as a line, not a status.
                self._chunk({"error": f"open /root/.ollama/models/blobs/{digest.replace(':', '-')}: "
                                      "no such file or directory"})
                return self._end_chunks()
            self._chunk({"status": f"using existing layer {digest}"})
        self._chunk({"status": "writing manifest"})
        self.server.models[_full_name(request["model"])] = request
        self._chunk({"status": "success"})
        self._end_chunks()

    def _show(self, request: dict[str, Any]) -> None:
        model = self.server.models.get(_full_name(request["model"]))
        if model is None:
            return self._json(404, {"error": f"model '{request['model']}' not found"})
        parameters = [f"{name:<30} {json.dumps(v) if isinstance(v, str) else v}"
                      for name, value in model.get("parameters", {}).items()
                      for v in (value if isinstance(value, list) else [value])]
        self._json(200, {"template": model.get("template", ""), "system": model.get("system", ""),
                         "parameters": "\n".join(parameters), "details": {"format": "gguf"}})

    def _json(self, status: int, payload: Any) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, event: dict[str, Any]) -> None:
        line = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    server = FakeOllama()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def chatml_tokenizer(tmp_path: Path) -> Path:
    """A saved Qwen-style tokenizer's metadata: ChatML template, <|endoftext|> as eos, more special tokens."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<tool_call>"],
        "tokenizer_class": "Qwen2Tokenizer",
    }))
    return folder


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """Stands in for an export: a few MiB, so the upload takes several blocks."""
    path = tmp_path / "export" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom(3 * 1024 * 1024))
    return path


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Host -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("configured", "env", "expected"), [
    (None, None, "http://127.0.0.1:11434"),
    (None, "0.0.0.0:11434", "http://127.0.0.1:11434"),
    (None, "0.0.0.0", "http://127.0.0.1:11434"),
    (None, "[::]:8000", "http://[::1]:8000"),
    (None, "gpu-box", "http://gpu-box:11434"),
    (None, "https://ollama.example.com", "https://ollama.example.com:443"),
    ("http://gpu-box:8080/", "elsewhere:1", "http://gpu-box:8080"),
    ("localhost:12345", None, "http://localhost:12345"),
])
def test_host_resolution(configured: str | None, env: str | None, expected: str,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    assert ollama_host(OllamaConfig(model_name="demo", host=configured)) == expected


# --- Template -------------------------------------------------------------------------------------------------


def test_chatml_template_and_stop() -> None:
    template, stops = ollama_template(CHATML_TEMPLATE)
    # Same layout as Ollama's official qwen2.5 template, tools left out.
    assert template == (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n'
        "{{ end }}{{ end }}\n"
        '{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n{{ end }}\n'
        "{{- end }}"
    )
    assert stops == ["<|im_end|>"]


def test_llama3_template_and_stop() -> None:
    template, stops = ollama_template(LLAMA3_TEMPLATE)
    assert template.startswith("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>")
    assert '{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>' in template
    assert "{{ if not $last }}<|eot_id|>{{ end }}" in template
    assert '$last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}' in template
    assert stops == ["<|eot_id|>"]  # not <|start_header_id|> and the like: those cut answers short


@pytest.mark.parametrize("chat_template", [
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:",
    # Phi-4: ChatML's tokens but `<|im_sep|>` after the role, so ChatML's layout would be wrong.
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{{ '<|im_start|>assistant<|im_sep|>' }}",
])
def test_unknown_template_names_what_was_looked_for(chat_template: str) -> None:
    with pytest.raises(ValueError, match=r"<\|im_start\|>.*<\|start_header_id\|>.*`ollama\.template`"):
        ollama_template(chat_template)


# --- Modelfile ------------------------------------------------------------------------------------------------


def test_modelfile_for_chatml_tokenizer(chatml_tokenizer: Path, gguf: Path) -> None:
    cfg = OllamaConfig(model_name="demo", num_ctx=2048, temperature=0.2)
    path = modelfile_spec(gguf, chatml_tokenizer, cfg).write(gguf.parent / "Modelfile")

    template, _ = ollama_template(CHATML_TEMPLATE)
    assert path.read_text() == (
        "FROM ./model.gguf\n"
        f'TEMPLATE """{template}"""\n'
        'PARAMETER stop "<|im_end|>"\n'  # the template's end of turn
        'PARAMETER stop "<|endoftext|>"\n'  # the tokenizer's eos; no other special token
        "PARAMETER num_ctx 2048\n"
        "PARAMETER temperature 0.2\n"
    )


def test_modelfile_reads_tokenizer_config_and_points_at_a_gguf_elsewhere(tmp_path: Path, gguf: Path) -> None:
    tokenizer = tmp_path / "llama"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE,
        "eos_token": {"content": "<|eot_id|>", "special": True},  # an AddedToken, as older savers wrote it
    }))
    path = modelfile_spec(gguf, tokenizer, OllamaConfig(model_name="demo")).write(tmp_path / "elsewhere" / "Modelfile")

    text = path.read_text()
    assert text.startswith(f"FROM {gguf.resolve()}\n")
    assert re.findall(r"PARAMETER stop (.*)", text) == ['"<|eot_id|>"']  # deduplicated


def test_stops_include_generation_config_eos_ids_and_no_other_special_token(tmp_path: Path, gguf: Path) -> None:
    """A Qwen fine-tune that ended turns with <|endoftext|> (a generation_config eos id) rambled on past <|im_end|>."""
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 151643, "content": "<|endoftext|>", "special": True},
        {"id": 151644, "content": "<|im_start|>", "special": True},
        {"id": 151645, "content": "<|im_end|>", "special": True},
    ]}))

    spec = modelfile_spec(gguf, folder, OllamaConfig(model_name="demo"))
    assert spec.stops == ["<|im_end|>", "<|endoftext|>"]  # end of turn first, each once, no <|im_start|>

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))  # a single id
    assert modelfile_spec(gguf, folder, OllamaConfig(model_name="demo")).stops == ["<|im_end|>", "<|endoftext|>"]


def test_system_prompt_default_from_template_and_from_config(tmp_path: Path, gguf: Path) -> None:
    tokenizer = tmp_path / "qwen"
    tokenizer.mkdir()
    (tokenizer / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    default = modelfile_spec(gguf, tokenizer, OllamaConfig(model_name="demo"))
    assert default.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    configured = modelfile_spec(gguf, tokenizer, OllamaConfig(model_name="demo", system='Answer in "JSON".\nOnly.'))
    text = configured.render(gguf.parent)
    assert 'SYSTEM """Answer in "JSON".\nOnly."""\n' in text


def test_triple_quotes_cannot_go_into_a_modelfile(chatml_tokenizer: Path, gguf: Path) -> None:
    spec = modelfile_spec(gguf, chatml_tokenizer, OllamaConfig(model_name="demo", system='Say """hi""".'))
    with pytest.raises(ValueError, match="system prompt contains"):
        spec.write(gguf.parent / "Modelfile")


def test_configured_template_keeps_stops(chatml_tokenizer: Path, gguf: Path) -> None:
    custom = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    spec = modelfile_spec(gguf, chatml_tokenizer, OllamaConfig(model_name="demo", template=custom))
    assert spec.template == custom
    assert spec.stops == ["<|im_end|>", "<|endoftext|>"]


# --- Registration against the stand-in ------------------------------------------------------------------------


def test_register_uploads_once_and_creates(fake_ollama: FakeOllama, chatml_tokenizer: Path, gguf: Path) -> None:
    cfg = OllamaConfig(model_name="demo", host=fake_ollama.url, num_ctx=2048)
    out_dir = gguf.parent

    first = register_model(gguf, chatml_tokenizer, cfg, out_dir)
    second = register_model(gguf, chatml_tokenizer, cfg, out_dir)

    assert (first.state, second.state) == ("registered", "registered")
    assert first.modelfile == out_dir / "Modelfile" and first.modelfile.read_text().startswith("FROM ./model.gguf\n")
    digest = _sha256(gguf.read_bytes())
    assert fake_ollama.blobs == {digest: gguf.read_bytes()}
    blob_calls = [c for c in fake_ollama.calls if "/api/blobs/" in c]
    assert blob_calls == [f"HEAD /api/blobs/{digest}", f"POST /api/blobs/{digest}", f"HEAD /api/blobs/{digest}"]

    template, _ = ollama_template(CHATML_TEMPLATE)
    assert fake_ollama.create_requests[-1] == {
        "model": "demo",
        "files": {"model.gguf": digest},
        "template": template,
        "parameters": {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048, "temperature": 0.0},
        "stream": True,
    }
    assert OllamaClient(fake_ollama.url, timeout_s=5).show("demo:latest")["template"] == template


def test_spec_sent_to_create_matches_modelfile(fake_ollama: FakeOllama, chatml_tokenizer: Path, gguf: Path) -> None:
    cfg = OllamaConfig(model_name="demo", host=fake_ollama.url, system="Be brief.")
    registration = register_model(gguf, chatml_tokenizer, cfg, gguf.parent)

    spec = modelfile_spec(gguf, chatml_tokenizer, cfg)
    sent = fake_ollama.create_requests[-1]
    assert registration.modelfile.read_text() == spec.render(gguf.parent)
    assert (sent["template"], sent["system"], sent["parameters"]) == (spec.template, "Be brief.", spec.api_parameters())


def test_unreachable_ollama_is_skipped_with_the_command_to_run(chatml_tokenizer: Path, gguf: Path) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    registration = register_model(gguf, chatml_tokenizer, OllamaConfig(model_name="demo", host=host), gguf.parent)

    assert registration.state == "skipped"
    assert registration.message == (
        f"skipped: Ollama not reachable at {host}; register later with: "
        f"cd {gguf.parent.resolve()} && OLLAMA_HOST={host} ollama create demo -f Modelfile"
    )
    assert registration.modelfile.read_text().startswith("FROM ./model.gguf\n")


def test_reachable_only_when_something_answers(fake_ollama: FakeOllama) -> None:
    closed = OllamaClient(f"http://127.0.0.1:{_closed_port()}", timeout_s=5)
    assert not closed.reachable()
    with pytest.raises(OllamaConnectionError):
        closed.version()
    assert OllamaClient(fake_ollama.url, timeout_s=5).reachable()
    # A server that answers with an error is a real problem, not an absent Ollama.
    with pytest.raises(OllamaError, match="HTTP 404"):
        OllamaClient(fake_ollama.url + "/not-ollama", timeout_s=5).reachable()


def test_error_line_from_create_raises(fake_ollama: FakeOllama) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    never_uploaded = "sha256:" + "0" * 64
    with pytest.raises(OllamaError, match="creating 'demo'.*no such file or directory"):
        client.create("demo", files={"model.gguf": never_uploaded}, template="{{ .Prompt }}", system=None,
                      parameters={})
    assert fake_ollama.models == {}


def test_digest_mismatch_is_refused(fake_ollama: FakeOllama, gguf: Path) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    with pytest.raises(OllamaError, match=r"POST .*/api/blobs/sha256:\w+: HTTP 400 Bad Request: digest mismatch"):
        client.push_blob(gguf, digest=_sha256(b"some other file"))
    assert fake_ollama.blobs == {}


def test_http_error_carries_the_server_message(fake_ollama: FakeOllama) -> None:
    with pytest.raises(OllamaError, match=rf"POST {fake_ollama.url}/api/show: HTTP 404 Not Found: model 'nope' not"):
        OllamaClient(fake_ollama.url, timeout_s=5).show("nope")


# --- A real Ollama, when one answers -------------------------------------------------------------------------

LIVE = OllamaClient(ollama_host(OllamaConfig(model_name="tunepipe-live-test")), timeout_s=600)


def _real_ollama_answers() -> bool:
    try:
        return LIVE.reachable()
    except OllamaError:  # something else listens there
        return False


needs_ollama = pytest.mark.skipif(not _real_ollama_answers(), reason=f"no Ollama answers at {LIVE.host} ($OLLAMA_HOST)")


@needs_ollama
def test_live_version() -> None:
    assert re.match(r"\d+\.\d+", LIVE.version())


@needs_ollama
@pytest.mark.skipif(not os.environ.get("TUNEPIPE_TEST_GGUF"), reason="set TUNEPIPE_TEST_GGUF to a ChatML GGUF")
def test_live_register_and_chat(chatml_tokenizer: Path, tmp_path: Path) -> None:
    cfg = OllamaConfig(model_name="tunepipe-live-test", host=LIVE.host)
    registration = register_model(Path(os.environ["TUNEPIPE_TEST_GGUF"]), chatml_tokenizer, cfg, tmp_path)
    assert registration.state == "registered", registration.message

    reply = LIVE.generate(cfg.model_name, [{"role": "user", "content": "Say hi."}], {"num_predict": 8})
    assert reply["done"] and reply["done_reason"] in {"stop", "length"}


@pytest.mark.parametrize("template", [QWEN25_TEMPLATE, LLAMA3_TEMPLATE, CHATML_TEMPLATE])
def test_default_system_prompt_probe_renders_exactly_as_transformers(template: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    from tasks.ollama import _render_chat_template

    messages = [{"role": "user", "content": "?"}]
    (expected,), _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                           bos_token="", eos_token="")
    assert _render_chat_template(template, messages) == expected
