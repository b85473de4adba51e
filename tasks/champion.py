"""The champion: the model tunepipe last promoted, as the MLflow model registry records it.

The contract (shared by evaluation, promotion, rollback and the retrain flow; see DESIGN.md):
- registered model: named after the pipeline (`PipelineConfig.name`); the version with alias `champion`
  is the champion, earlier versions stay for rollback;
- a version's source: `runs:/<run_id>/model`, the merged Hugging Face model and tokenizer of that run;
- a version's tags: `run_id`, `dataset.fingerprint`, `gguf.sha256`, `gguf.type`, `ollama.tag` (`NAME:VERSION`);
- Ollama's `NAME:latest` is a copy of `NAME:VERSION` of the champion; both move together.

This module reads the contract; promotion and rollback write it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT = "model"  # artifact folder of a run that holds the merged HF model + tokenizer


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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return ChampionRef(name=name, version=str(version.version), run_id=version.run_id or "",
                       source=version.source, tags=dict(version.tags))


def download_champion(tracking_uri: str, champion: ChampionRef, dest: Path) -> Path:
    """The champion's merged model folder, downloaded once to `dest` (a folder per version)."""
    import mlflow.artifacts

    folder = dest / f"{champion.name}-v{champion.version}"
    marker = folder / ".complete"
    if not marker.exists():
        mlflow.artifacts.download_artifacts(artifact_uri=champion.source, dst_path=str(folder),
                                            tracking_uri=tracking_uri)
        marker.write_text(champion.source + "\n")
    return folder / MODEL_ARTIFACT
