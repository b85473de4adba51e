"""A stand-in Ollama for tests (Ollama itself cannot be installed here): the documented HTTP API
(https://github.com/ollama/ollama/blob/main/docs/api.md), strictly, in memory.

Blobs are checked against their digest, create refuses unknown blobs and non-GGUF files (as an error line
after the stream started, like Ollama), show/copy/delete/chat answer 404 for unknown models, and chat answers
from the registered GGUF with llama-cpp-python: the prompt is the model's TEMPLATE rendered the way Ollama
renders it (Go's own text/template, through tasks/integrations/ollama/render.py), the Modelfile's SYSTEM added
when the request has none, decoding greedy, stopped by a `stop` string or the end-of-generation token
(`done_reason: stop`) or by `num_predict` (`done_reason: length`); a `format` (a JSON schema, or "json")
constrains the reply through llama.cpp's grammar made from it, as Ollama's structured outputs do. Every request
is recorded (method, path, JSON body) so tests can assert them exactly.

Faults, for the nightly paths (`fail`): the next requests to a path can find Ollama restarting (HTTP 503,
nothing done), killed before the request took effect (the connection closes; a create dies after its stream
started, before the manifest is written, as when the process ends mid-create), or killed after it took
effect, before the answer went out. Models survive, as Ollama keeps them on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tunepipe.tasks.integrations.ollama.render import render_served_prompt

BLOB_PATH = re.compile(r"/api/blobs/(?P<digest>[^/]*)")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)*(:[\w][\w.-]{0,127})?")
GGUF_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
CREATE_FIELDS = {
    "model",
    "from",
    "files",
    "adapters",
    "template",
    "license",
    "system",
    "parameters",
    "messages",
    "quantize",
    "stream",
}


def full_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


class FakeOllama(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, blob_dir: Path) -> None:
        super().__init__(("127.0.0.1", 0), FakeOllamaHandler)
        self.blob_dir = blob_dir  # blobs live on disk, as in Ollama, so llama.cpp can load them
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, dict[str, Any]] = {}  # full name → the create request that made it
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, JSON body or None), in order
        self._llms: dict[str, Any] = {}
        self._llm_lock = threading.Lock()
        self.faults: dict[str, list[str]] = {}  # path → faults for its next requests, in order

    def fail(self, path: str, *faults: str) -> None:
        """The next requests to `path` meet these faults, one each: "restarting" (HTTP 503), "killed" (before
        the request takes effect) or "answer_lost" (killed after it took effect, before the answer)."""
        assert set(faults) <= {"restarting", "killed", "answer_lost"}, faults
        self.faults.setdefault(path, []).extend(faults)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def calls(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.requests]

    def bodies(self, path: str) -> list[Any]:
        return [body for _, p, body in self.requests if p == path]

    @property
    def blobs(self) -> dict[str, bytes]:
        return {path.name.replace("-", ":", 1): path.read_bytes() for path in self.blob_dir.iterdir()}

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    def llm(self, digest: str):
        from tunepipe.tasks.integrations.llama_cpp import load_gguf

        with self._llm_lock:
            if digest not in self._llms:
                self._llms[digest] = load_gguf(self.blob_path(digest), n_ctx=2048)
            return self._llms[digest]

    def close(self) -> None:
        for llm in self._llms.values():
            llm.close()
        self.shutdown()
        self.server_close()


class FakeOllamaHandler(BaseHTTPRequestHandler):
    server: FakeOllama
    protocol_version = "HTTP/1.1"  # like Ollama: streams go out chunked

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._record(None)
        if self._fails_now():
            return
        if self.path == "/api/version":
            self._json(200, {"version": "0.0.0-fake"})
        elif self.path == "/api/tags":
            self._json(200, {"models": [self._tag_entry(name) for name in sorted(self.server.models)]})
        else:
            self._json(404, {"error": "404 page not found"})

    def do_HEAD(self) -> None:
        self._record(None)
        if self._fails_now():
            return
        blob = BLOB_PATH.fullmatch(self.path)
        exists = bool(blob) and DIGEST.fullmatch(blob["digest"]) and self.server.blob_path(blob["digest"]).exists()
        self.send_response(200 if exists else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self._body()
        if blob := BLOB_PATH.fullmatch(self.path):
            self._record(None)
            return None if self._fails_now() else self._receive_blob(blob["digest"], body)
        try:
            request = json.loads(body)
        except ValueError:
            self._record(body)
            return self._json(400, {"error": "invalid JSON"})
        self._record(request)
        if self._fails_now():
            return
        handler = {
            "/api/create": self._create,
            "/api/show": self._show,
            "/api/copy": self._copy,
            "/api/chat": self._chat,
        }.get(self.path)
        if handler is None:
            return self._json(404, {"error": "404 page not found"})
        handler(request)

    def do_DELETE(self) -> None:
        request = json.loads(self._body())
        self._record(request)
        if self._fails_now():
            return
        if self.path != "/api/delete":
            return self._json(404, {"error": "404 page not found"})
        if self.server.models.pop(full_name(request.get("model", "")), None) is None:
            return self._json(404, {"error": f"model '{request.get('model')}' not found"})
        self._json(200, None)

    # --- endpoints ------------------------------------------------------------------------------------------

    def _receive_blob(self, digest: str, data: bytes) -> None:
        if not DIGEST.fullmatch(digest):
            return self._json(400, {"error": "invalid digest format"})
        if self.server.blob_path(digest).exists():
            return self._json(200, None)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            return self._json(400, {"error": f"digest mismatch, expected {digest!r}, got {actual!r}"})
        self.server.blob_path(digest).write_bytes(data)
        self._json(201, None)

    def _create(self, request: dict[str, Any]) -> None:
        unknown = set(request) - CREATE_FIELDS
        model = request.get("model")
        if unknown or not isinstance(model, str) or not NAME.fullmatch(model):
            return self._json(400, {"error": f"invalid create request (model {model!r}, unknown {sorted(unknown)})"})
        if not request.get("files") and not request.get("from"):
            return self._json(400, {"error": "neither 'from' or 'files' was specified"})
        stream = self._start_stream(request)
        stream({"status": "parsing GGUF"})
        if self.fault == "killed":
            return self._die()
        for name, digest in {**request.get("files", {}), **request.get("adapters", {})}.items():
            path = self.server.blob_path(digest) if DIGEST.fullmatch(str(digest)) else None
            if path is None or not path.exists():
                # Ollama opens the blob after the stream has started: the failure comes as a line, not a status.
                return stream(
                    {"error": f"open /root/.ollama/models/blobs/{digest.replace(':', '-')}: no such file or directory"},
                    last=True,
                )
            if path.read_bytes()[:4] != b"GGUF":
                return stream({"error": f"{name}: invalid file magic"}, last=True)
            stream({"status": f"using existing layer {digest}"})
        stream({"status": "writing manifest"})
        self.server.models[full_name(model)] = request
        stream({"status": "success"}, last=True)

    def _show(self, request: dict[str, Any]) -> None:
        """As Ollama answers: the Modelfile it generates (FROM the weights blob's path on its disk), the
        parameters as text, and `model_info` from the GGUF's metadata (arrays left out, as without `verbose`)."""
        model = self._model(request.get("model"))
        if model is None:
            return
        from tunepipe.tasks.model.gguf_metadata import read_gguf_metadata

        parameters = [
            f"{name:<30} {json.dumps(v) if isinstance(v, str) else v}"
            for name, value in model.get("parameters", {}).items()
            for v in (value if isinstance(value, list) else [value])
        ]
        (digest,) = model["files"].values()
        blob = self.server.blob_path(digest)
        try:
            meta = read_gguf_metadata(blob)
        except ValueError:  # a test's stand-in bytes behind a GGUF magic: llama.cpp cannot read them
            meta = {}
        info = {key: _typed(value) for key, value in meta.items() if key != "vocab_size"}
        if meta:
            info.update(dict.fromkeys(GGUF_ARRAYS))  # arrays are null unless the request asks for `verbose`
        modelfile = (
            f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM '
            f"with:\n# FROM {full_name(request['model'])}\n\nFROM {blob.resolve()}\n"
            f'TEMPLATE """{model.get("template", "")}"""\n'
            + (f'SYSTEM """{model["system"]}"""\n' if model.get("system") else "")
            + "".join(f"PARAMETER {line}\n" for line in parameters)
        )
        self._json(
            200,
            {
                "template": model.get("template", ""),
                "system": model.get("system", ""),
                "parameters": "\n".join(parameters),
                "modelfile": modelfile,
                "details": {"format": "gguf", "family": meta.get("general.architecture")},
                "model_info": info,
            },
        )

    def _copy(self, request: dict[str, Any]) -> None:
        source, destination = request.get("source"), request.get("destination")
        if not isinstance(destination, str) or not NAME.fullmatch(destination):
            return self._json(400, {"error": f"invalid destination {destination!r}"})
        model = self._model(source)
        if model is None:
            return
        self.server.models[full_name(destination)] = model
        self._json(200, None)

    def _chat(self, request: dict[str, Any]) -> None:
        model = self._model(request.get("model"))
        if model is None:
            return
        messages = request.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
        ):
            return self._json(400, {"error": "messages: each needs role and content"})
        options = {**model.get("parameters", {}), **request.get("options", {})}
        think = request.get("think")  # Ollama's `think` flag reaches the template as .Think / .IsThinkSet
        prompt = render_served_prompt(
            model.get("template", "{{ .Prompt }}"),
            [{"role": m["role"], "content": m["content"]} for m in messages],
            model.get("system"),
            think if isinstance(think, bool) else None,
        )
        (digest,) = model["files"].values()
        content, done_reason = self._generate(digest, prompt, options, request.get("format"))
        reply = {
            "model": request["model"],
            "created_at": _now(),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": done_reason,
            "total_duration": 1,
            "eval_count": 1,
        }
        if request.get("stream", True):
            stream = self._start_stream(request)
            stream({**reply, "done": False, "done_reason": None, "message": reply["message"]})
            stream({**reply, "message": {"role": "assistant", "content": ""}}, last=True)
        else:
            self._json(200, reply)

    def _generate(self, digest: str, prompt: str, options: dict[str, Any], format: Any = None) -> tuple[str, str]:
        """Greedy decoding from the GGUF, stopped as Ollama stops: a stop string, end of generation, num_predict."""
        from llama_cpp import LlamaGrammar

        llm = self.server.llm(digest)
        stops = options.get("stop", [])
        num_predict = options.get("num_predict", -1)
        grammar = None
        if format:
            schema = {"type": "object"} if format == "json" else format
            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        with self.server._llm_lock:
            tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            generated: list[int] = []
            for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True, grammar=grammar):
                if token == llm.token_eos():
                    return _text(llm, generated), "stop"
                generated.append(token)
                text = _text(llm, generated)
                for stop in stops:
                    if stop in text:
                        return text[: text.index(stop)], "stop"
                if len(generated) == num_predict or len(tokens) + len(generated) >= llm.n_ctx():
                    return text, "length"
        raise AssertionError("unreachable")

    # --- plumbing -------------------------------------------------------------------------------------------

    def _model(self, name: Any) -> dict[str, Any] | None:
        model = self.server.models.get(full_name(name)) if isinstance(name, str) else None
        if model is None:
            self._json(404, {"error": f"model '{name}' not found"})
        return model

    def _tag_entry(self, name: str) -> dict[str, Any]:
        (digest,) = self.server.models[name]["files"].values()
        return {
            "name": name,
            "model": name,
            "modified_at": _now(),
            "size": self.server.blob_path(digest).stat().st_size,
            "digest": digest.removeprefix("sha256:"),
            "details": {"format": "gguf"},
        }

    def _record(self, body: Any) -> None:
        self.server.requests.append((self.command, self.path, body))
        queue = self.server.faults.get(self.path)
        self.fault = queue.pop(0) if queue else None

    def _fails_now(self) -> bool:
        """Answer a fault that strikes before the request takes effect; a create is killed mid-stream instead."""
        if self.fault == "restarting":
            self._json(503, {"error": "ollama is starting"})
            return True
        if self.fault == "killed" and self.path != "/api/create":
            self._die()
            return True
        return False

    def _die(self) -> None:
        """The server process ends: the connection closes, with no (or only part of an) answer."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _start_stream(self, request: dict[str, Any]):
        """A writer of NDJSON events; one JSON object when the request asked for `stream: false`."""
        streaming = request.get("stream", True)
        if streaming:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def send(event: dict[str, Any], last: bool = False) -> None:
            if last and self.fault == "answer_lost":
                return self._die()
            if not streaming:
                if last:
                    self._json(400 if "error" in event else 200, event)
                return
            line = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            if last:
                self.wfile.write(b"0\r\n\r\n")

        return send

    def _json(self, status: int, payload: Any) -> None:
        if self.fault == "answer_lost":
            return self._die()
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _typed(value: str):
    """A metadata value llama.cpp gives as text, as the JSON type Ollama's model_info has (number, bool)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _text(llm, tokens: list[int]) -> str:
    return llm.detokenize(tokens, special=True).decode("utf-8", "replace")


def _now() -> str:
    return datetime.now(UTC).isoformat()
