"""Reading the champion contract from a real MLflow registry (SQLite store, local artifacts)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tunepipe.tasks.integrations.model_registry import CHAMPION_ALIAS, MODEL_ARTIFACT, download_champion, find_champion


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment


def test_no_registered_model_or_no_alias_means_no_champion(tmp_path):
    uri, client, _ = _store(tmp_path)
    assert find_champion(uri, "pipe") is None
    client.create_registered_model("pipe")
    assert find_champion(uri, "pipe") is None


def test_champion_is_found_and_its_model_downloaded_once(tmp_path):
    uri, client, experiment = _store(tmp_path)
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT)
    client.create_registered_model("pipe")
    source = f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}"
    version = client.create_model_version("pipe", source, run_id=run.info.run_id, tags={"ollama.tag": "pipe:1"})
    client.set_registered_model_alias("pipe", CHAMPION_ALIAS, version.version)

    champion = find_champion(uri, "pipe")
    assert (champion.version, champion.run_id, champion.tags["ollama.tag"]) == ("1", run.info.run_id, "pipe:1")
    folder = download_champion(uri, champion, tmp_path / "cache")
    assert (folder / "config.json").read_text() == "{}"
    (folder / "config.json").unlink()  # a second call trusts the completed download
    assert download_champion(uri, champion, tmp_path / "cache") == folder
