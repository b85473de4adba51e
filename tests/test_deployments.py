"""prefect.yaml must point at flows that exist, with parameters those flows accept."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from tunepipe.tasks.runtime.config import PipelineConfig, load_config


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(Path("prefect.yaml").read_text())["deployments"]}


def test_every_deployment_entrypoint_loads_and_accepts_its_parameters():
    assert set(deployments()) == {"finetune", "retrain-from-rag", "evaluate"}
    for name, deployment in deployments().items():
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, name
        # The default config is configs/demo.yaml, field for field.
        assert PipelineConfig.model_validate(deployment["parameters"]["config"]) == load_config("configs/demo.yaml")


def test_the_ui_form_is_the_typed_config_with_descriptions_and_defaults():
    from prefect.utilities.callables import parameter_schema

    flow = load_flow_from_entrypoint(deployments()["finetune"]["entrypoint"])
    schema = parameter_schema(flow.fn).model_dump()
    definitions = schema["definitions"]
    assert schema["required"] == ["config"]
    assert definitions["TrainConfig"]["properties"]["max_steps"]["default"] == 100
    assert "unsloth" in definitions["TrainConfig"]["properties"]["backend"]["description"]
    assert definitions["RagConfig"]["properties"]["min_new_examples"]["description"]


def test_retrain_is_scheduled_nightly():
    (schedule,) = deployments()["retrain-from-rag"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"]
