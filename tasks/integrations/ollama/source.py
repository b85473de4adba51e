"""The GGUF behind a model Ollama already serves (`model.base: ollama:NAME[:TAG]`), to fine-tune from it.

Two ways, the first that knows the model wins:
- the API: `/api/show` returns the Modelfile Ollama generates for the model, whose `FROM` is the path of the
  weights blob on the server's disk (`.../models/blobs/sha256-<hex>`); usable when that disk is this one;
- the models folder ($OLLAMA_MODELS, else ~/.ollama/models): the manifest
  `manifests/<registry>/<namespace>/<name>/<tag>` lists the layers, and the one of media type
  `application/vnd.ollama.image.model` names the weights blob.
Blobs are content-addressed, so the digest in the file name identifies the weights for cache keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import BaseModel

from tunepipe.tasks.integrations.ollama.client import OllamaClient, OllamaConnectionError, OllamaError

MODEL_LAYER = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")


class OllamaGguf(BaseModel):
    name: str  # registry/namespace/model:tag, as Ollama completes a short name
    path: Path
    digest: str  # sha256:<hex>
    found_by: str  # "the API at <host>" or "the models folder <path>"


class OllamaSourceError(ValueError):
    """The model is not in Ollama, or its weights are not readable from here; the message says which and why."""


def models_folder() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def split_name(name: str) -> tuple[str, str, str, str]:
    """(registry, namespace, model, tag) as Ollama completes a name: `smollm2` is
    registry.ollama.ai/library/smollm2:latest."""
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = path.split("/")
    if not all(parts) or len(parts) > 3:
        raise OllamaSourceError(f"{name!r} is not an Ollama model name ([registry/][namespace/]model[:tag])")
    if len(parts) == 1:
        registry, namespace = DEFAULT_REGISTRY, DEFAULT_NAMESPACE
    elif len(parts) == 2:
        registry, namespace = DEFAULT_REGISTRY, parts[0]
    else:
        registry, namespace = parts[:2]
    return registry, namespace, parts[-1], tag or DEFAULT_TAG


def find_ollama_gguf(name: str, host: str) -> OllamaGguf:
    registry, namespace, model, tag = split_name(name)
    full = f"{registry}/{namespace}/{model}:{tag}"
    tried = []
    try:
        shown = OllamaClient(host, timeout_s=10).show(name)
    except OllamaConnectionError:
        tried.append(f"no Ollama answers at {host}")
    except OllamaError as exc:
        tried.append(f"the API at {host} does not know it ({exc})")
    else:
        source = _from_line(shown.modelfile or "")
        if source is not None and source.is_file() and BLOB_NAME.fullmatch(source.name):
            return OllamaGguf(
                name=full, path=source, digest=source.name.replace("-", ":", 1), found_by=f"the API at {host}"
            )
        tried.append(
            f"the API at {host} names the weights {source} (from /api/show's modelfile), "
            "which is not a blob readable here (is the server on another machine or container?)"
        )
    folder = models_folder()
    manifest = folder / "manifests" / registry / namespace / model / tag
    if manifest.is_file():
        layers = json.loads(manifest.read_text()).get("layers", [])
        digest = next((layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER), None)
        blob = folder / "blobs" / digest.replace(":", "-") if digest else None
        if blob is not None and blob.is_file():
            return OllamaGguf(name=full, path=blob, digest=digest, found_by=f"the models folder {folder}")
        tried.append(f"its manifest {manifest} names no weights blob that exists ({digest})")
    else:
        tried.append(f"the models folder {folder} has no manifest {manifest.relative_to(folder)}")
    raise OllamaSourceError(
        f"model.base 'ollama:{name}': cannot find its GGUF: {'; '.join(tried)}. Pull it first (`ollama pull "
        f"{name}`), set ollama.host to the server that has it, or set OLLAMA_MODELS to its models folder; or "
        "point model.base at the .gguf file."
    )


def _from_line(modelfile: str) -> Path | None:
    """The path on the first `FROM` line of a Modelfile that `ollama show --modelfile` generates."""
    for line in modelfile.splitlines():
        keyword, _, value = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            return Path(value.strip().strip('"'))
    return None
