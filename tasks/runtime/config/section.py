"""The base of every config section, and how a URL in one is shown where the config is stored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are typos in a user's YAML: fail loudly instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


def masked(url: str | None) -> str | None:
    # The config is a flow parameter: Prefect stores its JSON form. Credentials in a URL are masked there (and
    # in MLflow params and cache keys); the running flow keeps the real value.
    from tunepipe.tasks.runtime.redact import redact

    return None if url is None else redact(url)
