"""prefect.yaml must point at flows that exist, with parameters those flows accept."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint


def test_every_deployment_entrypoint_loads_and_accepts_its_parameters():
    deployments = yaml.safe_load(Path("prefect.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
        assert Path(deployment["parameters"]["config_path"]).is_file(), deployment["name"]
