"""Ollama's HTTP API (https://github.com/ollama/ollama/blob/main/docs/api.md), the calls tunepipe needs.

The official `ollama` client makes create (with `files`, template, system, parameters), show, copy, delete,
tags and chat (whose reply carries `done_reason`). Two calls are our own, on the same `httpx` it uses:
- blobs: its `create_blob` re-hashes the file and uploads it every time; we ask first (`HEAD`) and skip the
  upload of a GGUF the server already holds (gigabytes, on every re-registration), and take a digest we
  computed at export instead of hashing it again;
- `/api/version`, which it does not offer: the cheapest "does Ollama answer here" probe.
Both clients ignore $HTTP_PROXY (`trust_env=False`), which would otherwise capture calls to localhost.
Every failure is raised as OllamaError; OllamaConnectionError when no HTTP answer came at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama

from tunepipe.tasks.runtime.caching import file_digest

log = logging.getLogger(__name__)


class OllamaError(RuntimeError):
    """The Ollama server refused a request or reported a failure, or could not be talked to."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the answer, if one came


class OllamaConnectionError(OllamaError):
    """No HTTP answer: nothing listens, the connection broke off or timed out, or the peer does not speak HTTP."""


class OllamaClient:
    def __init__(self, host: str, timeout_s: float = 600) -> None:
        self.host = host.rstrip("/")
        self._api = ollama.Client(host=self.host, timeout=timeout_s, trust_env=False)
        self._http = httpx.Client(base_url=self.host, timeout=timeout_s, trust_env=False)

    def version(self, timeout_s: float | None = None) -> str:
        with self._call("GET /api/version"):
            response = self._http.get("/api/version", timeout=timeout_s or httpx.USE_CLIENT_DEFAULT)
            response.raise_for_status()
            return response.json()["version"]

    def reachable(self) -> bool:
        """Whether an Ollama server answers; an HTTP error from whatever listens there is raised, not hidden."""
        try:
            self.version(timeout_s=2)
        except OllamaConnectionError:
            return False
        return True

    def has_blob(self, digest: str) -> bool:
        with self._call(f"HEAD /api/blobs/{digest}"):
            response = self._http.head(f"/api/blobs/{digest}")
            if response.status_code == 404:
                return False
            response.raise_for_status()
            return True

    def push_blob(self, path: Path, digest: str | None = None) -> str:
        """Upload a file as a blob unless the server has it; return its digest. The server checks the digest."""
        digest = digest or file_digest(path)
        if self.has_blob(digest):
            log.info("ollama already has %s (%s)", path.name, digest)
            return digest
        with self._call(f"POST /api/blobs/{digest}"), path.open("rb") as body:
            response = self._http.post(
                f"/api/blobs/{digest}", content=body, headers={"Content-Length": str(path.stat().st_size)}
            )
            response.raise_for_status()  # 201 Created, or 200 when it appeared meanwhile
        return digest

    def create(
        self,
        name: str,
        files: dict[str, str],
        template: str,
        system: str | None,
        parameters: dict[str, Any],
        adapters: dict[str, str] | None = None,
    ) -> None:
        """Create (or replace) model `name` from uploaded blobs (`files`, `adapters`: file name → digest)."""
        status = None
        with self._call(f"creating {name!r}"):
            # Streamed: a failure after the stream started (a missing blob) comes as an error line, raised here.
            for progress in self._api.create(
                name,
                files=files,
                adapters=adapters,
                template=template,
                system=system,
                parameters=parameters,
                stream=True,
            ):
                status = progress.status
                log.info("ollama create %s: %s", name, status)
        if status != "success":
            raise OllamaError(f"creating {name!r} at {self.host}: the stream ended without success (last: {status})")

    def show(self, name: str) -> ollama.ShowResponse:
        with self._call(f"showing {name!r}"):
            return self._api.show(name)

    def copy(self, source: str, destination: str) -> None:
        with self._call(f"copying {source!r} to {destination!r}"):
            self._api.copy(source, destination)

    def delete(self, name: str) -> None:
        with self._call(f"deleting {name!r}"):
            self._api.delete(name)

    def tags(self) -> list[str]:
        """Names of every model the server holds (`NAME:TAG`)."""
        with self._call("listing models"):
            return [model.model for model in self._api.list().models]

    def chat(
        self, name: str, messages: list[dict[str, str]], options: dict[str, Any], format: dict[str, Any] | None = None
    ) -> ollama.ChatResponse:
        """One non-streamed chat completion: `message.content`, `done_reason` (`stop` or `length`), timings;
        `format`: a JSON schema the reply must follow."""
        with self._call(f"chat with {name!r}"):
            return self._api.chat(name, messages=messages, options=options, format=format, stream=False)

    def digest(self, name: str) -> str | None:
        """`sha256:<hex>` of model `name` as the server lists it; None when it holds no such model."""
        wanted = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        with self._call("listing models"):
            listed = {model.model: model.digest for model in self._api.list().models}
        return f"sha256:{listed[wanted]}" if listed.get(wanted) else None

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except ollama.ResponseError as exc:
            raise OllamaError(f"{what} at {self.host}: HTTP {exc.status_code}: {exc.error}", exc.status_code) from None
        except httpx.HTTPStatusError as exc:
            raise OllamaError(
                f"{what} at {self.host}: HTTP {exc.response.status_code}: {_error_text(exc.response)}",
                exc.response.status_code,
            ) from None
        except (ConnectionError, httpx.TransportError) as exc:  # the ollama client turns ConnectError into this
            raise OllamaConnectionError(f"{what} at {self.host}: {exc!r}") from exc


def _error_text(response: httpx.Response) -> str:
    """The server's `{"error": ...}` message, or the start of whatever else it sent."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:1000] or "(empty body)"
