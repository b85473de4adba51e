"""Register an exported GGUF in Ollama: a Modelfile on disk, and the same model created over Ollama's HTTP API.

The Modelfile is always written, so a model trained where no Ollama runs can be registered later with one
command. The HTTP side follows https://github.com/ollama/ollama/blob/main/docs/api.md: upload the GGUF as a
blob (`/api/blobs/sha256:…`), then `/api/create` with the blob's digest, template, system prompt and parameters.
Only the standard library speaks HTTP here; `http.client` rather than `urllib` because it streams a request
body from a file in large blocks, and it ignores $HTTP_PROXY, which would otherwise capture calls to localhost.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shlex
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.config import OllamaConfig

if TYPE_CHECKING:
    from tasks.export import ExportResult

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
UPLOAD_BLOCK = 1 << 20  # bytes per socket write when streaming a GGUF


# --- Where Ollama listens -----------------------------------------------------------------------------------


def ollama_host(cfg: OllamaConfig) -> str:
    """Base URL of the Ollama server: `cfg.host`, else $OLLAMA_HOST, else http://127.0.0.1:11434.

    Both accept Ollama's own forms (`host`, `host:port`, `scheme://host:port/path`); a bind-all address such as
    0.0.0.0 (how servers are often told to listen) is replaced by loopback, since a client cannot connect to it.
    """
    raw = (cfg.host or os.environ.get("OLLAMA_HOST", "")).strip().strip("\"'")
    if not raw:
        return DEFAULT_HOST
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    default_port = {"http": 80, "https": 443}.get(scheme, DEFAULT_PORT) if sep else DEFAULT_PORT
    url = urllib.parse.urlsplit(f"{scheme}://{rest}")
    try:
        port = url.port or default_port
    except ValueError as exc:
        raise ValueError(f"Ollama host {raw!r}: {exc}") from None
    host = url.hostname or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None  # a host name
    if address is not None and address.is_unspecified:
        address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
    if address is not None:
        host = f"[{address}]" if address.version == 6 else str(address)
    return f"{scheme}://{host}:{port}{url.path.rstrip('/')}"


# --- Chat template → Ollama template ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """One family of chat templates: how a turn opens and closes, in the tokens the model was trained on."""

    name: str
    markers: tuple[str, ...]  # all of them occur in a Hugging Face template of this family
    turn_header: str  # opens a turn; `{role}` is replaced
    end_of_turn: str  # closes a turn, including any newline after it
    assistant_role: str = "assistant"
    excludes: tuple[str, ...] = ()  # markers of a look-alike family with a different layout
    system_in_first_user_turn: bool = False  # Gemma has no system turn: the prompt opens the first user turn

    @property
    def stop(self) -> str:
        return self.end_of_turn.strip()

    def header(self, role: str) -> str:
        return self.turn_header.replace("{role}", role)


CHAT_FORMATS = (
    # Phi-4 writes `<|im_start|>user<|im_sep|>` instead of ChatML's newline; it must not pass for ChatML.
    ChatFormat("ChatML", ("<|im_start|>", "<|im_end|>"), "<|im_start|>{role}\n", "<|im_end|>\n",
               excludes=("<|im_sep|>",)),
    ChatFormat("Llama 3", ("<|start_header_id|>", "<|eot_id|>"), "<|start_header_id|>{role}<|end_header_id|>\n\n",
               "<|eot_id|>"),
    ChatFormat("Gemma", ("<start_of_turn>", "<end_of_turn>"), "<start_of_turn>{role}\n", "<end_of_turn>\n",
               assistant_role="model", system_in_first_user_turn=True),
    ChatFormat("Phi-3", ("<|user|>", "<|end|>"), "<|{role}|>\n", "<|end|>\n"),
)


def detect_chat_format(chat_template: str) -> ChatFormat | None:
    """The first family whose markers all occur in the Hugging Face template, if any."""
    for fmt in CHAT_FORMATS:
        if all(m in chat_template for m in fmt.markers) and not any(m in chat_template for m in fmt.excludes):
            return fmt
    return None


def ollama_template(chat_template: str) -> tuple[str, list[str]]:
    """The Ollama Go TEMPLATE equivalent to a Hugging Face Jinja chat template, and its stop strings.

    Stops are the end-of-turn marker only: stopping on every special token cuts answers short (ollama#17939).
    """
    fmt = detect_chat_format(chat_template)
    if fmt is None:
        looked_for = "; ".join(f"{f.name} ({', '.join(f.markers)})" for f in CHAT_FORMATS)
        raise ValueError(
            f"unrecognised chat template: looked for the markers of {looked_for} and found none of these sets. "
            "Set `ollama.template` in the config to an Ollama Go template for this model "
            "(https://github.com/ollama/ollama/blob/main/docs/template.mdx)."
        )
    return _go_template(fmt), [fmt.stop]


def _go_template(fmt: ChatFormat) -> str:
    """Ollama's `.Messages` form, laid out like its official qwen2.5 and llama3.2 templates.

    Ollama collects every system message into `.System` (and the Modelfile's SYSTEM when the request has none)
    but also leaves them in `.Messages`, so the loop renders user and assistant turns only. A final assistant
    message is left open, so a caller can have the model continue it; otherwise the assistant turn is opened.
    """
    user, assistant, end = fmt.header("user"), fmt.header(fmt.assistant_role), fmt.end_of_turn
    if fmt.system_in_first_user_turn:
        system = "{{- $system := .System }}\n"
        user += '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    else:
        system = "{{- if .System }}" + fmt.header("system") + "{{ .System }}" + end + "{{ end }}\n"
    # After each `end` comes an action without `{{-`, which would also trim the newline that ends the turn.
    return (
        system
        + "{{- range $i, $_ := .Messages }}\n"
        + "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        + '{{- if eq .Role "user" }}' + user + "{{ .Content }}" + end
        + '{{ else if eq .Role "assistant" }}' + assistant + "{{ .Content }}{{ if not $last }}" + end
        + "{{ end }}{{ end }}\n"
        + '{{- if and (ne .Role "assistant") $last }}' + assistant + "{{ end }}\n"
        + "{{- end }}"
    )


def default_system_prompt(chat_template: str, fmt: ChatFormat) -> str | None:
    """The system prompt the template adds to a conversation that has none (Qwen2.5: "You are Qwen, ...")."""
    if fmt.system_in_first_user_turn:
        return None
    rendered = _render_chat_template(chat_template, [{"role": "user", "content": "?"}])
    head = fmt.header("system")
    return rendered[len(head):].partition(fmt.end_of_turn)[0] if rendered.startswith(head) else None


def _render_chat_template(chat_template: str, messages: list[dict[str, str]]) -> str:
    """Render as transformers does, in the Jinja environment its chat-template docs specify.

    Importing transformers for this would add seconds to every run, cached ones included.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )


# --- Modelfile ----------------------------------------------------------------------------------------------


class ModelfileSpec(BaseModel):
    """What the Modelfile says, as data: written to disk and sent to /api/create alike, so they cannot differ."""

    model_config = ConfigDict(frozen=True)

    gguf: Path
    template: str
    stops: list[str]
    parameters: dict[str, int | float]  # every PARAMETER but `stop`
    system: str | None = None

    def api_parameters(self) -> dict[str, Any]:
        """The `parameters` field of /api/create."""
        return {"stop": list(self.stops), **self.parameters}

    def render(self, folder: Path) -> str:
        """Modelfile text for a Modelfile in `folder`: FROM is relative when the GGUF lies inside it."""
        gguf = self.gguf.resolve()
        folder = folder.resolve()
        source = f"./{gguf.relative_to(folder).as_posix()}" if gguf.is_relative_to(folder) else str(gguf)
        lines = [f"FROM {source if _bare(source) else _quoted(source, 'the GGUF path')}",
                 f'TEMPLATE """{_checked(self.template, "the template")}"""']
        if self.system is not None:
            lines.append(f'SYSTEM """{_checked(self.system, "the system prompt")}"""')
        lines += [f"PARAMETER stop {_quoted(stop, 'a stop string')}" for stop in self.stops]
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def write(self, out_path: Path) -> Path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(self.render(out_path.parent), encoding="utf-8")
        return out_path


# Ollama's Modelfile parser has no escapes: a value is bare (no spaces), "quoted" or """triple-quoted""",
# and a triple-quoted value ends at the first `"""` followed by whitespace. So `"""` inside a value is refused.
def _checked(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f'{what} contains """, which a Modelfile cannot hold (its parser has no escapes)')
    return value


def _quoted(value: str, what: str) -> str:
    _checked(value, what)
    return f'"""{value}"""' if any(c in value for c in '"\r\n') else f'"{value}"'


def _bare(value: str) -> bool:
    return bool(value) and not any(c.isspace() or c == '"' for c in value)


def modelfile_spec(gguf_path: Path, tokenizer_dir: Path, cfg: OllamaConfig) -> ModelfileSpec:
    """Template and stops from the tokenizer's chat template (or `cfg.template`), parameters from `cfg`.

    The stops hold every token the trained model may end a turn with, end-of-turn marker first: the template's
    end-of-turn marker, the tokenizer's eos token, and generation_config.json's eos ids (a Qwen fine-tune
    ending turns with <|endoftext|> rambled past <|im_end|>). No other special token: those cut answers short.
    The system prompt is `cfg.system`, else (for a derived template) the one the chat template adds by default.
    """
    chat_template, eos = _read_tokenizer(tokenizer_dir)
    system = cfg.system
    if cfg.template is not None:
        template = cfg.template
        fmt = detect_chat_format(chat_template) if chat_template else None
        stops = [fmt.stop] if fmt else []
    elif chat_template is None:
        raise ValueError(
            f"{tokenizer_dir}: no chat template (looked for chat_template.jinja and `chat_template` in "
            "tokenizer_config.json); set `ollama.template` in the config to an Ollama Go template."
        )
    else:
        template, stops = ollama_template(chat_template)
        if system is None:  # serve what the model saw in training when a request brings no system prompt
            system = default_system_prompt(chat_template, detect_chat_format(chat_template))
    end_tokens = [eos] if eos else []
    # dict.fromkeys drops repeats and keeps the first occurrence's place: the end-of-turn marker stays first.
    stops = list(dict.fromkeys([*stops, *end_tokens, *_generation_eos_tokens(tokenizer_dir)]))
    return ModelfileSpec(gguf=gguf_path, template=template, stops=stops, system=system,
                         parameters={"num_ctx": cfg.num_ctx, "temperature": cfg.temperature})


def _read_tokenizer(tokenizer_dir: Path) -> tuple[str | None, str | None]:
    """The chat template and eos token a saved Hugging Face tokenizer folder holds."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    jinja_file = tokenizer_dir / "chat_template.jinja"  # where transformers saves it now; it takes precedence
    chat_template = jinja_file.read_text(encoding="utf-8") if jinja_file.exists() else config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # a serialised AddedToken
        eos = eos.get("content")
    return chat_template, eos


def _generation_eos_tokens(model_dir: Path) -> list[str]:
    """The tokens behind generation_config.json's `eos_token_id` (an int or a list), which generation stops on.

    Ids map to text through tokenizer.json: its `added_tokens` first (where special tokens live), else the vocab.
    """
    config_file = model_dir / "generation_config.json"
    if not config_file.exists():
        return []
    eos_ids = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token_id")
    if eos_ids is None:
        return []
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    tokens = _token_texts(model_dir / "tokenizer.json")
    missing = [i for i in ids if i not in tokens]
    if missing:  # a slow-tokenizer-only folder, say; the template's marker and eos token still stop it
        log.warning("%s: eos token ids %s not found in tokenizer.json; no stop added for them", model_dir, missing)
    return [tokens[i] for i in ids if i in tokens]


def _token_texts(tokenizer_file: Path) -> dict[int, str]:
    """Token id → text from a fast tokenizer's tokenizer.json; empty when there is none."""
    if not tokenizer_file.exists():
        return {}
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = tokenizer.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [text, score] pairs, indexed by id
        texts = {i: entry[0] for i, entry in enumerate(vocab)}
    else:  # BPE, WordPiece: text → id
        texts = {i: text for text, i in vocab.items()}
    texts.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    return texts


# --- HTTP client --------------------------------------------------------------------------------------------


class OllamaError(RuntimeError):
    """The Ollama server refused a request or reported a failure, or could not be talked to."""


class OllamaConnectionError(OllamaError):
    """No HTTP answer: nothing listens, the connection broke off or timed out, or the peer does not speak HTTP."""


class OllamaClient:
    """Ollama's HTTP API, the calls tunepipe needs; every failure raises OllamaError."""

    def __init__(self, host: str, timeout_s: float = 600) -> None:
        self.host = host.rstrip("/")
        self.timeout_s = timeout_s  # socket timeout: the longest wait for any one read or write
        url = urllib.parse.urlsplit(self.host)
        self._connection = HTTPSConnection if url.scheme == "https" else HTTPConnection
        self._netloc, self._base_path = url.netloc, url.path

    def version(self, timeout_s: float | None = None) -> str:
        with self._request("GET", "/api/version", timeout_s=timeout_s) as response:
            return json.load(response)["version"]

    def reachable(self) -> bool:
        """Whether an Ollama server answers; an HTTP error from whatever listens there is raised, not hidden."""
        try:
            self.version(timeout_s=2)
        except OllamaConnectionError:
            return False
        return True

    def has_blob(self, digest: str) -> bool:
        with self._request("HEAD", f"/api/blobs/{digest}", allow=(404,)) as response:
            return response.status == 200

    def push_blob(self, path: Path, digest: str | None = None) -> str:
        """Upload a file as a blob unless the server has it; return its digest, `sha256:<hex>`.

        `digest` may be given when already known (hashing a large GGUF takes a while); the server checks it.
        """
        if digest is None:
            with path.open("rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()  # hashes in chunks
        if self.has_blob(digest):
            log.info("ollama already has %s (%s)", path.name, digest)
            return digest
        headers = {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"}
        with path.open("rb") as body, self._request("POST", f"/api/blobs/{digest}", body=body, headers=headers):
            pass  # 201 Created, or 200 when it appeared meanwhile; errors were raised by _request
        return digest

    def create(self, name: str, files: dict[str, str], template: str, system: str | None,
               parameters: dict[str, Any]) -> None:
        """Create (or replace) model `name` from uploaded blobs (`files`: file name → digest)."""
        payload: dict[str, Any] = {"model": name, "files": files, "template": template, "parameters": parameters,
                                   "stream": True}
        if system is not None:
            payload["system"] = system
        status = None
        with self._request("POST", "/api/create", json_body=payload) as response:
            for line in response:  # NDJSON progress: {"status": ...}, an {"error": ...} line on failure
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    raise OllamaError(f"creating {name!r} at {self.host} failed: {event['error']}")
                status = event.get("status")
                log.info("ollama create %s: %s", name, status)
        if status != "success":
            raise OllamaError(f"creating {name!r} at {self.host}: the stream ended without success (last: {status})")

    def show(self, name: str) -> dict[str, Any]:
        with self._request("POST", "/api/show", json_body={"model": name}) as response:
            return json.load(response)

    def generate(self, name: str, prompt_messages: list[dict[str, str]], options: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed chat completion; the reply holds `message`, `done_reason` and timings."""
        payload = {"model": name, "messages": prompt_messages, "options": options, "stream": False}
        with self._request("POST", "/api/chat", json_body=payload) as response:
            return json.load(response)

    @contextmanager
    def _request(self, method: str, path: str, *, json_body: Any = None, body: Any = None,
                 headers: dict[str, str] | None = None, allow: tuple[int, ...] = (),
                 timeout_s: float | None = None) -> Iterator[HTTPResponse]:
        """Send one request and yield the response; an HTTP error status (not in `allow`) raises OllamaError.

        Failures while the caller reads the response (a stream broken off) raise OllamaConnectionError too.
        """
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connection(self._netloc, timeout=timeout_s or self.timeout_s, blocksize=UPLOAD_BLOCK)
        try:
            connection.request(method, self._base_path + path, body=body, headers=headers)
            response = connection.getresponse()
            if response.status >= 400 and response.status not in allow:
                raise OllamaError(f"{method} {self.host}{path}: HTTP {response.status} {response.reason}: "
                                  f"{_error_text(response.read())}")
            yield response
        except (OSError, HTTPException) as exc:
            raise OllamaConnectionError(f"{method} {self.host}{path}: {exc!r}") from exc
        finally:
            connection.close()


def _error_text(body: bytes) -> str:
    """The server's `{"error": ...}` message, or the start of whatever else it sent."""
    text = body.decode("utf-8", "replace").strip()
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:1000] or "(empty body)"


# --- Registration -------------------------------------------------------------------------------------------


class Registration(BaseModel):
    """Outcome of `register_model`: `message` says what happened, or the command that registers it later."""

    model_name: str
    state: Literal["registered", "skipped"]
    message: str
    modelfile: Path
    host: str


def register_model(gguf_path: Path, tokenizer_dir: Path, cfg: OllamaConfig, out_dir: Path) -> Registration:
    """Write `out_dir/Modelfile`, then create the model in Ollama if one answers (else say how to, later).

    The GGUF is not copied: the Modelfile points at it. Failures of a server that answers raise OllamaError.
    """
    spec = modelfile_spec(gguf_path, tokenizer_dir, cfg)
    modelfile = spec.write(out_dir / "Modelfile")
    host = ollama_host(cfg)
    client = OllamaClient(host, cfg.timeout_s)
    if not client.reachable():
        # The CLI talks to $OLLAMA_HOST, not to our config; FROM resolves against the Modelfile's folder.
        env = "" if host == DEFAULT_HOST else f"OLLAMA_HOST={shlex.quote(host)} "
        command = (f"cd {shlex.quote(str(out_dir.resolve()))} && "
                   f"{env}ollama create {shlex.quote(cfg.model_name)} -f Modelfile")
        return Registration(model_name=cfg.model_name, state="skipped", modelfile=modelfile, host=host,
                            message=f"skipped: Ollama not reachable at {host}; register later with: {command}")

    digest = client.push_blob(gguf_path)
    client.create(cfg.model_name, files={gguf_path.name: digest}, template=spec.template, system=spec.system,
                  parameters=spec.api_parameters())
    shown = client.show(cfg.model_name)
    if shown.get("template") != spec.template:
        raise OllamaError(f"{cfg.model_name!r} was created at {host} but reports a different template than sent")
    return Registration(model_name=cfg.model_name, state="registered", modelfile=modelfile, host=host,
                        message=f"registered {cfg.model_name} at {host} from {gguf_path.name} ({digest})")


@task(name="register_in_ollama")
def register(exported: ExportResult, cfg: OllamaConfig) -> Registration:
    # Not cached: whether the model is registered depends on the Ollama server, not on our inputs.
    # The Modelfile sits beside the GGUF so the export folder alone is enough to register it later.
    return register_model(exported.gguf_path, exported.merged_dir, cfg, exported.gguf_path.parent)
