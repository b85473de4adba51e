"""The base model's identity: what a cache key needs to know about it, without loading it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel

from tasks.config import ModelConfig

# Weight files are hashed by size plus their first and last MiB: exact for any edit tools make in practice,
# and seconds instead of minutes for a multi-GB local checkpoint.
_SAMPLE = 1 << 20


class BaseModelRef(BaseModel):
    name_or_path: str
    revision: str | None
    fingerprint: str


def resolve_base_model(cfg: ModelConfig) -> BaseModelRef:
    """Identify `cfg.base`: a content hash for a local folder, the resolved commit for a hub id."""
    folder = Path(cfg.base).expanduser()
    if folder.is_dir():
        return BaseModelRef(name_or_path=str(folder.resolve()), revision=None, fingerprint=_hash_folder(folder))
    return BaseModelRef(name_or_path=cfg.base, revision=cfg.revision, fingerprint=_hub_commit(cfg))


def load_tokenizer(base: BaseModelRef, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path, revision=base.revision)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{base.name_or_path} has no chat template: set model.chat_template in the config "
            "(a base model needs one chosen for it before fine-tuning)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hash_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
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


def _hub_commit(cfg: ModelConfig) -> str:
    """The commit a hub id resolves to, so `main` moving on upstream invalidates the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(cfg.base, revision=cfg.revision).sha or f"{cfg.base}@{cfg.revision}"
    except (HfHubHTTPError, OSError) as exc:
        # Offline: the revision string is the best identity we have; a pinned commit makes it exact.
        if cfg.revision is None:
            raise ValueError(
                f"model.base {cfg.base!r} is neither a local folder nor reachable on the hub ({exc}); "
                "pass a folder, or pin model.revision to a commit to run offline from the HF cache"
            ) from exc
        return f"{cfg.base}@{cfg.revision}"
