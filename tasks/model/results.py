"""The base model as every stage refers to it: its identity for cache keys.

A plain model that imports no stage.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class BaseModelRef(BaseModel):
    name_or_path: str
    revision: str | None
    fingerprint: str
    gguf: Path | None = None  # the GGUF the folder `name_or_path` was built from (a .gguf or ollama: base)
