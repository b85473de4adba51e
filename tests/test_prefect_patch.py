"""Prefect's temporary server started early (tasks/patches/prefect.py): the same server Prefect starts, used
without Prefect's server module, and with the patch off, Prefect's own public path."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tunepipe.tasks import patches
from tunepipe.tasks.patches import prefect as prefect_patch

REPO = Path(__file__).resolve().parents[1]
HELLO_FLOW = (
    "from prefect import flow, task\n"
    "@task\n"
    "def one(): return 1\n"
    "@flow\n"
    "def hello(): return one()\n"
    "state = hello(return_state=True)\n"
)


@pytest.fixture
def fresh_guard(monkeypatch):
    for key in (patches.OFF_SWITCH, "PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(key, raising=False)
    patches.enabled.cache_clear()
    started = []
    monkeypatch.setattr(prefect_patch, "server_process", lambda args, env: started.append(args) or FakeProcess())
    monkeypatch.setattr(prefect_patch.atexit, "register", lambda stop: None)
    yield started
    patches.enabled.cache_clear()


class FakeProcess:
    def poll(self):
        return None


def clean_env(**settings: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PREFECT_") and key != patches.OFF_SWITCH
    }
    return {**env, "PYTHONPATH": str(REPO), **settings}


def in_profile(tmp_path: Path, settings: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python whose active Prefect profile sets `settings` (TOML lines)."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "team"\n[profiles.team]\n{settings}\n')
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PROFILES_PATH=str(profiles))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_on_the_proven_prefect_the_server_starts_before_prefect_is_imported(fresh_guard):
    server = prefect_patch.start_temporary_server()
    assert server is not None and fresh_guard and "prefect.server.api.server:create_app" in fresh_guard[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ


@pytest.mark.parametrize("how", ["switch", "version"])
def test_off_nothing_starts_early_and_prefect_starts_its_own_server_when_asked(fresh_guard, monkeypatch, how):
    if how == "switch":
        monkeypatch.setenv(patches.OFF_SWITCH, "prefect")
    else:
        installed = importlib.metadata.version
        monkeypatch.setattr(
            patches.importlib.metadata, "version", lambda name: "3.10.0" if name == "prefect" else installed(name)
        )
    assert prefect_patch.start_temporary_server() is None and fresh_guard == []
    # Prefect's own start waits as long as the early one would.
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == str(prefect_patch.STARTUP_TIMEOUT_S)
    prefect_patch.use_temporary_server(None)  # leaves Prefect's settings alone
    assert "PREFECT_API_URL" not in os.environ


def test_an_api_in_the_environment_starts_no_server(fresh_guard, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_patch.start_temporary_server() is None and fresh_guard == []


def test_the_early_temporary_server_is_started_as_prefect_starts_it(tmp_path):
    """The command Prefect's own `SubprocessASGIServer` uses, and an environment from which the server reads the
    settings Prefect would have passed it, a profile's included."""
    script = (
        "import json, subprocess, sys\n"
        "import prefect.server.api.server as prefect_server\n"
        "from tunepipe.tasks.patches.prefect import server_command\n"
        "started, popen = {}, subprocess.Popen\n"
        "prefect_server.subprocess.Popen = lambda args, env: started.update(args=args, env=env)\n"
        "prefect_server.SubprocessASGIServer(port=8765)._run_uvicorn_command()\n"
        "subprocess.Popen = popen\n"
        "args, env = server_command(8765)\n"
        "read = 'from prefect.settings import get_current_settings; print(get_current_settings().model_dump_json())'\n"
        "settings = [subprocess.run([sys.executable, '-c', read], env=e, capture_output=True, text=True,\n"
        "                           check=True).stdout for e in (started['env'], env)]\n"
        "print(json.dumps([args == started['args'], settings[0] == settings[1], json.loads(settings[1])]))\n"
    )
    done = in_profile(tmp_path, "PREFECT_API_REQUEST_TIMEOUT = 17.5", script)
    same_args, same_settings, settings = json.loads(done.stdout.splitlines()[-1])
    assert same_args and same_settings and settings["api"]["request_timeout"] == 17.5


@pytest.mark.slow
def test_a_flow_runs_on_the_early_server_without_prefects_server_module(tmp_path):
    """The CLI waits for the server itself and hands its URL to Prefect's clients, since Prefect's own
    `SubprocessASGIServer` lives in its server module, whose import takes seconds. The server stops when the
    run's process exits."""
    script = (
        "import sys\n"
        "from tunepipe.tasks.patches.prefect import start_temporary_server, use_temporary_server\n"
        "server = start_temporary_server()\n"
        "use_temporary_server(server)\n"
        f"{HELLO_FLOW}"
        "print(server.process.pid, state.name, 'prefect.server.api.server' in sys.modules)\n"
    )
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pid, state, imported = done.stdout.split()
    assert (state, imported, running(int(pid))) == ("Completed", "False", False)
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        assert db.execute("select state_name from flow_run").fetchall() == [("Completed",)]


@pytest.mark.slow
def test_with_the_patch_off_a_flow_runs_on_prefects_own_temporary_server(tmp_path):
    """TUNEPIPE_PATCHES=prefect: nothing starts early, one line says so, and Prefect starts its own server."""
    script = (
        "import sys\n"
        "from tunepipe.tasks.patches.prefect import start_temporary_server, use_temporary_server\n"
        "server = start_temporary_server()\n"
        "use_temporary_server(server)\n"
        f"{HELLO_FLOW}"
        "print(server, state.name, 'prefect.server.api.server' in sys.modules)\n"
    )
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"), TUNEPIPE_PATCHES="prefect")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["None", "Completed", "True"]
    assert "prefect: tunepipe's patches are off" in done.stderr
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        assert db.execute("select state_name from flow_run").fetchall() == [("Completed",)]


@pytest.mark.slow
def test_an_api_set_only_in_a_prefect_profile_is_used_and_the_early_server_stopped_unannounced(tmp_path):
    """The server starts before Prefect can say whether a profile configures an API; once Prefect is imported,
    the profile's API wins and the server is stopped without a word."""
    script = (
        "from tunepipe.tasks.patches.prefect import start_temporary_server, use_temporary_server\n"
        "server = start_temporary_server()\n"
        "use_temporary_server(server)\n"
        "from prefect.settings import PREFECT_API_URL\n"
        "print(server.process.returncode is not None, PREFECT_API_URL.value())\n"
    )
    done = in_profile(tmp_path, 'PREFECT_API_URL = "http://127.0.0.1:9/api"', script)
    assert done.stdout.split() == ["True", "http://127.0.0.1:9/api"]
    assert "temporary server" not in done.stderr
