"""The champion: the model tunepipe last promoted, as the MLflow model registry records it.

The contract (shared by evaluation, promotion, rollback and the retrain flow; see DESIGN.md):
- registered model: named after the pipeline (`PipelineConfig.name`); the version with alias `champion`
  is the champion, earlier versions stay for rollback;
- a version's source: `runs:/<run_id>/model`, the merged Hugging Face model and tokenizer of that run;
- a version's tags: `run_id`, `dataset.fingerprint`, `gguf.sha256`, `gguf.type`, `ollama.tag` (`NAME:VERSION`);
- Ollama's `NAME:latest` is a copy of `NAME:VERSION` of the champion; both move together.

Reading: `find_champion`, `download_champion`. Writing: `register_version` (a new version, not yet champion),
`promote` (alias and `NAME:latest` to a version, remembering the one before in the version's
`previous_champion` tag) and `rollback` (both back to that one). When one of the pair fails to move, the other
is put back, so Ollama and MLflow never disagree about the champion.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from tunepipe.tasks.integrations.ollama.client import OllamaClient

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT = "model"  # artifact folder of a run that holds the merged HF model + tokenizer
PREVIOUS_TAG = "previous_champion"  # on a promoted version: the version that was champion before it


class ChampionRef(BaseModel):
    """One registered version, without its weights: enough to key a cache and to decide whether to load."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]


def find_champion(tracking_uri: str, name: str) -> ChampionRef | None:
    """The version that alias `champion` points at, or None when nothing was promoted yet."""
    from mlflow.exceptions import MlflowException

    try:
        version = _registry(tracking_uri).get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return _ref(name, version)


def download_champion(tracking_uri: str, champion: ChampionRef, dest: Path) -> Path:
    """The champion's merged model folder, downloaded once to `dest` (a folder per version)."""
    import mlflow.artifacts

    folder = dest / f"{champion.name}-v{champion.version}"
    marker = folder / ".complete"
    if not marker.exists():
        mlflow.artifacts.download_artifacts(
            artifact_uri=champion.source, dst_path=str(folder), tracking_uri=tracking_uri
        )
        marker.write_text(champion.source + "\n")
    return folder / MODEL_ARTIFACT


class ChampionMove(BaseModel):
    """A promotion or rollback: the champion went from `previous` (None: there was none) to `version`."""

    name: str
    version: str
    previous: str | None
    ollama_tag: str  # NAME:VERSION, now also NAME:latest


def register_version(tracking_uri: str, name: str, run_id: str, tags: dict[str, str]) -> str:
    """The version of registered model `name` for run `run_id`'s merged model with these tags: the one made
    before (a retried or repeated registration) or a new one. The alias does not move."""
    from mlflow.exceptions import MlflowException

    client = _registry(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Promoted by tunepipe: alias `champion` is served.")
    source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if existing.source == source and all(existing.tags.get(key) == value for key, value in tags.items()):
            return str(existing.version)
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"run_id": run_id, **tags})
    return str(version.version)


def tag_version(tracking_uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    client = _registry(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote(tracking_uri: str, name: str, version: str, ollama: OllamaClient) -> ChampionMove:
    """Make `version` the champion: copy its `NAME:VERSION` to `NAME:latest`, then move the alias."""
    client = _registry(tracking_uri)
    current = find_champion(tracking_uri, name)
    target = _ref(name, client.get_model_version(name, version))
    if current is not None and current.version == target.version:
        # Already moved (a retry after the alias moved but the answer was lost): the pair is put in step
        # again and the champion before it is the one recorded then.
        previous = target.tags.get(PREVIOUS_TAG)
    else:
        previous = current.version if current is not None else None
        if previous is not None:  # recorded first: a version is only read for rollback once it is champion
            client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
    _move(client, ollama, target, current)
    return ChampionMove(name=name, version=version, previous=previous, ollama_tag=target.tags["ollama.tag"])


def rollback(tracking_uri: str, name: str, ollama: OllamaClient) -> ChampionMove:
    """Move the champion back to the version it replaced: alias and `NAME:latest` together."""
    client = _registry(tracking_uri)
    current = find_champion(tracking_uri, name)
    if current is None:
        raise ValueError(f"{name!r} has no champion in {tracking_uri}: nothing to roll back")
    if PREVIOUS_TAG not in current.tags:
        raise ValueError(f"{name!r} version {current.version} is the first champion: nothing to roll back to")
    target = _ref(name, client.get_model_version(name, current.tags[PREVIOUS_TAG]))
    if target.tags["ollama.tag"] not in ollama.tags():
        raise ValueError(
            f"{target.tags['ollama.tag']} (version {target.version}) is no longer in Ollama at "
            f"{ollama.host}; register it again with: tunepipe register {target.run_id}"
        )
    _move(client, ollama, target, current)
    client.set_model_version_tag(name, current.version, "rolled_back_to", target.version)
    return ChampionMove(
        name=name, version=target.version, previous=current.version, ollama_tag=target.tags["ollama.tag"]
    )


def _move(client, ollama: OllamaClient, target: ChampionRef, current: ChampionRef | None) -> None:
    """`NAME:latest` then the alias to `target`; if the alias cannot move, `NAME:latest` goes back."""
    tag = target.tags["ollama.tag"]
    latest = tag.rsplit(":", 1)[0] + ":latest"
    ollama.copy(tag, latest)
    try:
        client.set_registered_model_alias(target.name, CHAMPION_ALIAS, target.version)
    except BaseException:
        if current is not None:
            ollama.copy(current.tags["ollama.tag"], latest)
        else:
            ollama.delete(latest)
        raise


def _registry(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _ref(name: str, version) -> ChampionRef:
    return ChampionRef(
        name=name,
        version=str(version.version),
        run_id=version.run_id or "",
        source=version.source,
        tags=dict(version.tags),
    )
