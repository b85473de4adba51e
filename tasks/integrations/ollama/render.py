"""The prompt Ollama's /api/chat feeds a model, rendered by Go's own text/template as Ollama's server does.

The harness in `gotemplate/` (a small Go program on the standard library) fills a TEMPLATE the way the server
does: the Modelfile's SYSTEM prepended when a request has none, system messages collected into `.System`,
consecutive messages of one role joined with a blank line, `.Prompt`/`.Response` for legacy templates. It is
built once per source version with `go build` and cached; one process answers every render of a Python
process, a JSON line each way.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from tunepipe.tasks.integrations.llama_cpp import cache_root

SOURCE = Path(__file__).with_name("gotemplate")
GO_MISSING = (
    "Go is not installed, and tunepipe checks Ollama templates with Go's own text/template: install it with "
    "`apt-get install golang-go` (Debian/Ubuntu; `make setup` does this) or put a `go` binary on PATH"
)


def render_served_prompt(
    template: str, messages: list[dict], system: str | None = None, think: bool | None = None
) -> str:
    """What Ollama feeds the model for /api/chat `messages` under TEMPLATE `template` and Modelfile SYSTEM `system`.

    `think` is the request's `think` flag (None: not sent). Raises ValueError when Go cannot parse or execute it.
    """
    return _renderer().render(template, messages, system, think)


def harness_path() -> Path:
    """Where the harness built from this version of its source lives (it may not be built yet)."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache_root() / f"gotemplate-{digest.hexdigest()[:16]}" / "gotemplate"


def harness() -> Path:
    """The built harness, built now when this version of its source has not been built yet."""
    binary = harness_path()
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(GO_MISSING)
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Offline and with the installed toolchain only: a newer Go would otherwise try to fetch one.
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOCACHE": os.environ.get("GOCACHE", str(cache_root() / "go-build")),
    }
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:  # built aside, then moved: no half-written binary
        built = Path(tmp) / "gotemplate"
        done = subprocess.run([go, "build", "-o", str(built), "."], cwd=SOURCE, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`go build` of {SOURCE} failed:\n{done.stderr.strip()}")
        built.replace(binary)
    return binary


class _Renderer:
    """One harness process, a request line in and an answer line out; shared by the threads of this process."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [str(harness())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8"
        )
        self._lock = threading.Lock()
        atexit.register(self.close)

    def render(self, template: str, messages: list[dict], system: str | None, think: bool | None) -> str:
        request = {
            "template": template,
            "system": system or "",
            "think": think,
            "messages": [
                {"role": m["role"], "content": m.get("content") or "", "thinking": m.get("thinking") or ""}
                for m in messages
            ],
        }
        with self._lock:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the Go template harness exited (code {self._process.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(f"Go's text/template: {answer['error']}")
        return answer["prompt"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=10)


_shared: _Renderer | None = None
_shared_lock = threading.Lock()


def _renderer() -> _Renderer:
    global _shared
    with _shared_lock:
        if _shared is None or _shared._process.poll() is not None:
            _shared = _Renderer()
        return _shared


if __name__ == "__main__":  # set-up builds the harness ahead of the first test
    print(f"Go template harness: {harness()}")
