"""`tunepipe doctor`: what this machine offers a tunepipe run, and what a given config needs that it lacks.

Every check is quick (network probes time out after PROBE_TIMEOUT_S, the base model's hub lookup after
base_model.HUB_TIMEOUT_S, and all run side by side), imports nothing heavier than torch, and never imports
unsloth or bitsandbytes: they are looked up, not loaded, so the doctor is safe on any machine. A check is `fail`
only when the config cannot run without it; missing extras are `warn`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from tunepipe.tasks.runtime.config import OllamaConfig, PipelineConfig, TrackingConfig
from tunepipe.tasks.runtime.redact import error_line, redact

PROBE_TIMEOUT_S = 2.0
PACKAGES = ("torch", "transformers", "peft", "trl", "prefect", "mlflow", "great_expectations", "llama-cpp-python")
# Default ports of the database servers MLflow can track to, for a TCP reachability probe.
DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}

Status = Literal["ok", "info", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def diagnose(cfg: PipelineConfig | None = None) -> list[Check]:
    """Every check, in display order; with a config, `fail` marks what that config needs and is missing."""
    checks: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", _python),
        ("packages", _packages),
        ("CUDA", partial(_accelerator, cfg)),
        ("llama.cpp converter", _llama_cpp_converter),
        ("Go", _go_template),
        ("Prefect API", _prefect_api),
        ("MLflow tracking", partial(_mlflow, cfg.tracking if cfg else TrackingConfig())),
        ("Ollama", partial(_ollama, cfg.ollama if cfg else OllamaConfig(model_name="-"))),
        ("Hugging Face hub", _hub),
    ]
    if cfg is not None:
        checks += [("model.base", partial(_base_model, cfg)), ("data", partial(_data_files, cfg))]
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        results = list(pool.map(lambda named: _guarded(*named), checks))
    return [check for result in results for check in result]


def _guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """A check that crashes is a finding, not a crash of the doctor."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001
        return [Check(name, "fail", f"check crashed: {error_line(exc)}")]


def _python() -> list[Check]:
    ok = sys.version_info >= (3, 11)
    return [
        Check(
            "python",
            "ok" if ok else "fail",
            f"{sys.version.split()[0]} ({sys.executable})" + ("" if ok else ": tunepipe needs 3.11+"),
        )
    ]


def _packages() -> list[Check]:
    from packaging.requirements import Requirement

    try:
        pins = {
            Requirement(r).name.lower().replace("_", "-"): Requirement(r).specifier
            for r in importlib.metadata.requires("tunepipe") or []
            if "extra ==" not in r
        }
    except importlib.metadata.PackageNotFoundError:
        pins = {}
    checks = []
    for package in PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(package, "fail", "not installed: run `make setup` (or pip install -e .)"))
            continue
        pin = pins.get(package.lower().replace("_", "-"))
        if pin and not pin.contains(version, prereleases=True):
            checks.append(Check(package, "warn", f"{version}; tunepipe is tested with {pin}"))
        else:
            checks.append(Check(package, "ok", version))
    return checks


def _accelerator(cfg: PipelineConfig | None) -> list[Check]:
    import torch

    wants_unsloth = cfg is not None and cfg.train.backend == "unsloth"
    wants_4bit = cfg is not None and cfg.model.load_in_4bit
    if not torch.cuda.is_available():
        reason = "train.backend: unsloth" if wants_unsloth else "model.load_in_4bit: true" if wants_4bit else ""
        gpu = Check(
            "CUDA",
            "fail" if reason else "info",
            f"no CUDA GPU (torch {torch.__version__})"
            + (f", but the config sets {reason}, which needs one" if reason else ": training runs on the CPU"),
        )
        unsloth = Check("unsloth", "fail" if wants_unsloth else "info", "not usable: needs CUDA")
        bnb = Check("bitsandbytes", "fail" if wants_4bit else "info", "not usable: 4-bit loading needs CUDA")
        return [gpu, unsloth, bnb]
    devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    bf16 = torch.cuda.is_bf16_supported()
    gpu = Check(
        "CUDA",
        "ok",
        "; ".join(f"{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB" for i, p in enumerate(devices))
        + f" (CUDA {torch.version.cuda}, bf16 {'yes' if bf16 else 'no: training uses fp16'})",
    )
    return [
        gpu,
        _extra(
            "unsloth", "fail" if wants_unsloth else "warn", "`train.backend: auto` falls back to transformers + peft"
        ),
        _extra("bitsandbytes", "fail" if wants_4bit else "warn", "model.load_in_4bit cannot be used"),
    ]


def _extra(package: str, missing: Status, consequence: str) -> Check:
    """A GPU extra, found without importing it (importing unsloth patches transformers for the whole process)."""
    if importlib.util.find_spec(package) is None:
        return Check(package, missing, f'not installed (pip install -e ".[gpu]"): {consequence}')
    return Check(package, "ok", f"{importlib.metadata.version(package)}, usable (CUDA present)")


def _llama_cpp_converter() -> list[Check]:
    from tunepipe.tasks.integrations.llama_cpp import converter_dir

    try:
        folder = converter_dir()
    except importlib.metadata.PackageNotFoundError:
        return [Check("llama.cpp converter", "fail", "llama-cpp-python is not installed: run `make setup`")]
    if (folder / ".complete").exists():
        return [Check("llama.cpp converter", "ok", str(folder))]
    return [
        Check(
            "llama.cpp converter",
            "fail",
            f"not fetched yet ({folder}): run `python -m tunepipe.tasks.integrations.llama_cpp` once (needs PyPI)",
        )
    ]


def _go_template() -> list[Check]:
    """Registration proves the Ollama TEMPLATE with Go's text/template (tasks/integrations/ollama/render.py)."""
    import shutil

    from tunepipe.tasks.integrations.ollama.render import GO_MISSING, harness_path

    if harness_path().exists():
        return [Check("Go template harness", "ok", str(harness_path()))]
    if shutil.which("go"):
        return [Check("Go template harness", "ok", f"not built yet; {shutil.which('go')} builds it on first use")]
    return [Check("Go template harness", "fail", GO_MISSING)]


def _prefect_api() -> list[Check]:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    url = PREFECT_API_URL.value()
    if not url:
        return [
            Check(
                "Prefect API",
                "ok",
                f"ephemeral: a temporary server starts with each run (PREFECT_HOME={PREFECT_HOME.value()})",
            )
        ]
    problem = _http_problem(f"{url.rstrip('/')}/health")
    return [
        Check(
            "Prefect API",
            "fail" if problem else "ok",
            redact(url)
            + (f": not reachable ({problem}); start it or unset PREFECT_API_URL" if problem else ": reachable"),
        )
    ]


def _mlflow(cfg: TrackingConfig) -> list[Check]:
    uri, shown = cfg.uri, redact(cfg.uri)
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme
    if scheme in ("", "file", "sqlite"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0] if scheme == "sqlite" else parts.path or uri)
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            return [Check("MLflow tracking", "fail", f"{shown}: {existing} is not writable")]
        state = "exists" if path.exists() else "created on the first run"
        return [Check("MLflow tracking", "ok", f"{shown} ({state})")]
    if scheme in ("http", "https"):  # MLflow's server answers /health; credentials are not needed for it
        health = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
        problem = _http_problem(health)
    elif scheme.split("+")[0] in DB_PORTS:
        problem = _tcp_problem(parts.hostname or "localhost", parts.port or DB_PORTS[scheme.split("+")[0]])
    else:
        return [Check("MLflow tracking", "info", f"{shown}: not probed")]
    return [
        Check(
            "MLflow tracking",
            "fail" if problem else "ok",
            f"{shown}: " + (f"not reachable ({problem})" if problem else "reachable"),
        )
    ]


def _ollama(cfg: OllamaConfig) -> list[Check]:
    from tunepipe.tasks.integrations.ollama.client import OllamaClient
    from tunepipe.tasks.integrations.ollama.host import ollama_host

    host = ollama_host(cfg.host)
    try:
        version = OllamaClient(host, timeout_s=PROBE_TIMEOUT_S).version(timeout_s=PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001  (any failure means the same thing here)
        return [
            Check(
                "Ollama",
                "warn",
                f"{redact(host)}: not reachable ({error_line(exc)}); runs still export "
                "the GGUFs and a Modelfile, and print the `tunepipe register` command",
            )
        ]
    return [Check("Ollama", "ok", f"{redact(host)}: version {version}")]


def _hub() -> list[Check]:
    from huggingface_hub import constants, get_token

    token = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "saved login" if get_token() else None
    token_note = f"token: {token}" if token else "no token (public models only)"
    if constants.HF_HUB_OFFLINE:
        return [
            Check(
                "Hugging Face hub",
                "info",
                f"offline (HF_HUB_OFFLINE=1): hub ids load from the HF cache ({constants.HF_HUB_CACHE}); {token_note}",
            )
        ]
    problem = _http_problem(constants.ENDPOINT, method="HEAD")
    return [
        Check(
            "Hugging Face hub",
            "warn" if problem else "ok",
            f"{redact(constants.ENDPOINT)}: "
            + (
                f"not reachable ({problem}): use local folders, or the HF cache with HF_HUB_OFFLINE=1"
                if problem
                else "reachable"
            )
            + f"; {token_note}",
        )
    ]


def _base_model(cfg: PipelineConfig) -> list[Check]:
    """The run's own preflight (tasks/model/base.py): the same message the run would stop with."""
    from tunepipe.tasks.model.base import BaseModelError, resolve_base_model

    try:
        ref = resolve_base_model(cfg.model, cfg.ollama)
    except BaseModelError as exc:
        return [Check("model.base", "fail", str(exc))]
    where = (
        f"GGUF {ref.gguf}, as transformers folder {ref.name_or_path}"
        if ref.gguf
        else "local folder"
        if Path(ref.name_or_path).is_dir()
        else f"commit {ref.fingerprint[:12]}"
    )
    return [Check("model.base", "ok", f"{cfg.model.base} ({where})")]


def _data_files(cfg: PipelineConfig) -> list[Check]:
    """Whether data.train/eval name files the loader can find (a file, folder, glob or LLaMA-Factory folder)."""
    from tunepipe.tasks.data.containers import DataFileError
    from tunepipe.tasks.data.files import resolve_sources

    checks = []
    for field, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path is None:
            continue
        try:
            sources = resolve_sources(path, field, cfg.data.datasets)
        except (DataFileError, FileNotFoundError) as exc:
            checks.append(Check(field, "fail", str(exc)))
            continue
        detail = str(path) if [s.path for s in sources] == [path] else f"{path} ({len(sources)} files)"
        checks.append(Check(field, "ok", detail))
    return checks


def _http_problem(url: str, method: str = "GET") -> str | None:
    """None when `url` answers at all (any HTTP status means something is listening), else why not."""
    import httpx

    try:
        httpx.request(method, url, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as exc:
        return error_line(exc)
    return None


def _tcp_problem(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return error_line(exc)
    return None
