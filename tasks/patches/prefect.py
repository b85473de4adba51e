"""Prefect: start its temporary API server before Prefect is imported.

With no API configured, Prefect starts a temporary server (`SubprocessASGIServer`) when a flow first asks for a
client: after the imports of Prefect, its server module and the flows, and in the terminal's process group. The
early start launches the same server process first thing, so that its boot overlaps those imports, and in a
process group of its own, so that Ctrl-C reaches the run but not the server: the run reports its Crashed state
to the server, then the exit handlers stop it. In the terminal's group the server would die first and the run
would retry its last report against nothing.

The command and environment are those of Prefect's private `SubprocessASGIServer._run_uvicorn_command`, its
private `PREFECT__SERVER_*` variables included, hence the version guard. Off (another Prefect, or
`TUNEPIPE_PATCHES=off`), nothing starts early and Prefect starts its own temporary server when first asked.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunepipe.tasks.patches import enabled

PROVEN = "==3.9.1"
# Prefect's own default wait is short on a busy machine; the public path gets the same limit.
STARTUP_TIMEOUT_S = 120


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_up(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait for the server's health check, as `SubprocessASGIServer.start` does: a server whose port was
        taken meanwhile (uvicorn's exit status 3) starts again on another."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() == 3:
                    self.port = free_port()
                    self.process = server_process(*server_command(self.port))
                elif self.process.poll() is not None:
                    raise RuntimeError(f"Prefect's temporary server exited with status {self.process.returncode}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.ConnectError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s")

    def discard(self) -> None:
        """Stop a server nobody used, without a word (it was never announced)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            server_logger().info("Stopping temporary server on %s", self.api_url.removesuffix("/api"))
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_temporary_server() -> TemporaryServer | None:
    """Start the process of Prefect's temporary server now, without importing Prefect; `use_temporary_server`
    waits for it. None when `PREFECT_API_URL` is set, or when the patch is off: Prefect then starts its own
    server when first asked. The server stops at exit, after Prefect's own exit handlers have sent the run's
    last states and events."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if not enabled("prefect", PROVEN):
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S))
        return None
    port = free_port()
    server = TemporaryServer(server_process(*server_command(port)), port)
    atexit.register(server.stop)  # registered before Prefect's handlers, so it runs after them
    return server


def use_temporary_server(server: TemporaryServer | None) -> None:
    """Once Prefect may be imported: point its clients (and the workers this process starts) at `server` as a
    configured `PREFECT_API_URL` would, once it answers, so that Prefect never imports its server module (its
    whole server) only to wait for it. An API configured where only Prefect's settings see it (a profile,
    prefect.toml) wins, and the server is stopped unused. The UI is off there: no UI links are logged."""
    if server is None:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        server.discard()
        return
    server_logger().info("Starting temporary server on %s", server.api_url.removesuffix("/api"))
    server.wait_until_up()
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()


def server_logger():
    from prefect.logging import get_logger

    return get_logger()  # the logger Prefect's own temporary server reports on


def free_port() -> int:
    with socket.socket() as probe:  # should it be taken before the server binds it, the server starts again
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment `SubprocessASGIServer._run_uvicorn_command` starts the server with. Prefect
    also passes its settings as environment variables; the server reads them for itself from the same
    environment, folder and profile (tests/test_prefect_patch.py holds the two equal)."""
    prefect_package = Path(importlib.util.find_spec("prefect").origin).parent
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect_package.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return args, env


def server_process(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, process_group=0)  # a group of its own: see the module's docstring
