"""Register, smoke-test, promote and roll back (tasks/serve/task.py, tasks/integrations/model_registry.py,
flows/serve.py) against the strict stand-in Ollama (tests/fake_ollama.py), whose chat answers from the registered
GGUF with llama.cpp, and a real MLflow model registry (SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import closed_port, gguf_file
from fake_ollama import FakeOllama

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.export.results import GgufFile
from tunepipe.tasks.integrations.model_registry import find_champion, rollback
from tunepipe.tasks.integrations.ollama.client import OllamaClient
from tunepipe.tasks.integrations.ollama.modelfile import modelfile_spec
from tunepipe.tasks.runtime.config import OllamaConfig
from tunepipe.tasks.serve.results import PLAN_ARTIFACT, ServingPlan, SmokeCase
from tunepipe.tasks.serve.task import SmokeTestFailed, promote_candidate, register_candidate, smoke_test_model

pytestmark = pytest.mark.slow  # serves GGUF models through the stand-in Ollama

SYSTEM = "Extract the product as JSON."
QUESTIONS = ["<div>Kettle, $25</div>", "<div>Lamp, $12</div>"]


@pytest.fixture(scope="module")
def rambling_gguf(tiny_gguf: Path) -> GgufFile:
    """The untrained tiny model: it does not stop within a few tokens."""
    return gguf_file(tiny_gguf)


@pytest.fixture(scope="module")
def mlflow_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tracking URI, run id) of a finished run holding a `model` artifact, as a finetune run leaves it."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(tiny_model), "model")
    client.set_terminated(run_id)
    return uri, run_id


def _plan(gguf: GgufFile, name: str, host: str, mlflow_run: tuple[str, str], tokenizer_dir: Path) -> ServingPlan:
    uri, run_id = mlflow_run
    cfg = OllamaConfig(model_name=name, host=host, num_ctx=512)
    spec = modelfile_spec(gguf.path, tokenizer_dir, **cfg.modelfile_settings(), trained_system=SYSTEM)
    return ServingPlan(
        run_id=run_id,
        tracking_uri=uri,
        registered_model=f"pipeline-{name}",
        dataset_fingerprint="f" * 64,
        gguf=gguf,
        spec=spec,
        modelfile=spec.write(gguf.path.parent / "Modelfile"),
        ollama=cfg,
        output_format="json",
        required_keys=[],
        max_new_tokens=8,
        smoke_cases=[
            SmokeCase(name=f"q{i}", messages=[{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)
        ],
    )


def _serve(plan: ServingPlan):
    registration = register_candidate(plan)
    return registration, smoke_test_model(plan, registration), promote_candidate(plan, registration)


def _next_candidate(plan: ServingPlan) -> ServingPlan:
    """A later candidate of the same pipeline (trained on other data): served, it becomes a new version."""
    return plan.model_copy(update={"dataset_fingerprint": "e" * 64})


def test_register_smoke_test_promote_sends_exactly_the_documented_requests(
    fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    from mlflow.tracking import MlflowClient

    plan = _plan(obedient_gguf, "obedient", fake_ollama.url, mlflow_run, tiny_model)
    registration, smoke, move = _serve(plan)

    digest = f"sha256:{obedient_gguf.sha256}"
    chat_options = {"temperature": 0, "num_predict": 8}
    assert fake_ollama.requests == [
        ("GET", "/api/version", None),
        ("HEAD", f"/api/blobs/{digest}", None),
        ("POST", f"/api/blobs/{digest}", None),
        (
            "POST",
            "/api/create",
            {
                "model": "obedient:1",
                "stream": True,
                "files": {"model-f16.gguf": digest},
                "template": plan.spec.template,
                "system": SYSTEM,
                "parameters": plan.spec.api_parameters(),
            },
        ),
        ("POST", "/api/show", {"model": "obedient:1"}),
        *[
            (
                "POST",
                "/api/chat",
                {
                    "model": "obedient:1",
                    "messages": [{"role": "user", "content": q}],
                    "stream": False,
                    "options": chat_options,
                    "tools": [],
                },
            )
            for q in QUESTIONS
        ],
        ("POST", "/api/copy", {"source": "obedient:1", "destination": "obedient:latest"}),
    ]
    assert [(r.answer, r.done_reason, r.problems) for r in smoke.results] == [("{}", "stop", [])] * 2
    assert (registration.version, registration.ollama_tag, move.version, move.previous) == (
        "1",
        "obedient:1",
        "1",
        None,
    )

    uri, run_id = mlflow_run
    champion = find_champion(uri, "pipeline-obedient")
    assert champion.version == "1" and champion.source == f"runs:/{run_id}/model"
    assert {
        k: champion.tags[k] for k in ("run_id", "dataset.fingerprint", "gguf.sha256", "gguf.type", "ollama.tag")
    } == {
        "run_id": run_id,
        "dataset.fingerprint": "f" * 64,
        "gguf.sha256": obedient_gguf.sha256,
        "gguf.type": "f16",
        "ollama.tag": "obedient:1",
    }
    assert champion.tags["smoke_test"] == "passed"
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["ollama.tag"] == "obedient:1"


def test_second_promotion_keeps_the_first_and_rollback_moves_both_back(
    fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    uri, _ = mlflow_run
    plan = _plan(obedient_gguf, "twice", fake_ollama.url, mlflow_run, tiny_model)
    _serve(plan)
    _, _, second = _serve(_next_candidate(plan))
    assert (second.version, second.previous) == ("2", "1")
    assert fake_ollama.calls.count(f"POST /api/blobs/sha256:{obedient_gguf.sha256}") == 1  # uploaded once
    assert set(fake_ollama.models) == {"twice:1", "twice:2", "twice:latest"}
    assert fake_ollama.models["twice:latest"] is fake_ollama.models["twice:2"]

    fake_ollama.requests.clear()
    back = rollback(uri, "pipeline-twice", OllamaClient(fake_ollama.url, timeout_s=5))

    assert (back.version, back.previous, back.ollama_tag) == ("1", "2", "twice:1")
    assert fake_ollama.requests == [
        ("GET", "/api/tags", None),
        ("POST", "/api/copy", {"source": "twice:1", "destination": "twice:latest"}),
    ]
    assert fake_ollama.models["twice:latest"] is fake_ollama.models["twice:1"]
    assert find_champion(uri, "pipeline-twice").version == "1"
    with pytest.raises(ValueError, match="first champion: nothing to roll back to"):
        rollback(uri, "pipeline-twice", OllamaClient(fake_ollama.url, timeout_s=5))


def test_rollback_refuses_when_the_previous_model_left_ollama(
    fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    uri, run_id = mlflow_run
    plan = _plan(obedient_gguf, "gone", fake_ollama.url, mlflow_run, tiny_model)
    _serve(plan)
    _serve(_next_candidate(plan))
    OllamaClient(fake_ollama.url, timeout_s=5).delete("gone:1")

    with pytest.raises(ValueError, match=f"gone:1 .version 1. is no longer in Ollama .*tunepipe register {run_id}"):
        rollback(uri, "pipeline-gone", OllamaClient(fake_ollama.url, timeout_s=5))
    assert find_champion(uri, "pipeline-gone").version == "2"
    assert fake_ollama.models["gone:latest"] is fake_ollama.models["gone:2"]


def test_rollback_command(
    fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    from tunepipe.deployments.cli import main

    uri, _ = mlflow_run
    plan = _plan(obedient_gguf, "cli", fake_ollama.url, mlflow_run, tiny_model)
    _serve(plan)
    _serve(_next_candidate(plan))
    assert main(["rollback", "pipeline-cli", "--tracking-uri", uri, "--ollama-host", fake_ollama.url]) == 0
    assert "champion moved back from v2 to v1" in capsys.readouterr().out
    assert main(["rollback", "pipeline-nothing", "--tracking-uri", uri, "--ollama-host", fake_ollama.url]) == 1
    assert "has no champion" in capsys.readouterr().err


def test_failed_smoke_test_removes_the_model_and_keeps_the_champion(
    fake_ollama: FakeOllama, obedient_gguf: GgufFile, rambling_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    uri, _ = mlflow_run
    _serve(_plan(obedient_gguf, "guarded", fake_ollama.url, mlflow_run, tiny_model))
    plan = _plan(rambling_gguf, "guarded", fake_ollama.url, mlflow_run, tiny_model)
    registration = register_candidate(plan)

    with pytest.raises(SmokeTestFailed, match=r"guarded:2 failed \(0/2 answers passed: q0: ended by 'length'"):
        smoke_test_model(plan, registration)

    assert fake_ollama.requests[-1] == ("DELETE", "/api/delete", {"model": "guarded:2"})
    assert set(fake_ollama.models) == {"guarded:1", "guarded:latest"}
    champion = find_champion(uri, "pipeline-guarded")
    assert champion.version == "1"
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_model_version("pipeline-guarded", "2").tags["smoke_test"] == "failed"


def test_unreachable_ollama_registers_nothing_and_says_how_to_finish(
    obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, run_id = mlflow_run
    host = f"http://127.0.0.1:{closed_port()}"
    registration = register_candidate(_plan(obedient_gguf, "offline", host, mlflow_run, tiny_model))

    assert registration.state == "unreachable"
    assert registration.message.endswith(f"finish with: OLLAMA_HOST={host} tunepipe register {run_id}")
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(MlflowException):
        client.get_registered_model("pipeline-offline")
    assert client.get_run(run_id).data.tags["ollama.state"] == "unreachable"


def test_register_command_finishes_a_logged_plan(
    prefect_server, fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path, tmp_path: Path
) -> None:
    """`tunepipe register RUN_ID`: the serve flow from the plan the run logged, through to promotion."""
    from mlflow.tracking import MlflowClient

    from tunepipe.deployments.cli import main

    uri, run_id = mlflow_run
    plan = _plan(obedient_gguf, "later", fake_ollama.url, mlflow_run, tiny_model)
    MlflowClient(tracking_uri=uri).log_text(run_id, plan.model_dump_json(), PLAN_ARTIFACT)

    assert main(["register", run_id, "--tracking-uri", uri]) == 0
    assert find_champion(uri, "pipeline-later").tags["ollama.tag"] == "later:1"
    assert fake_ollama.models["later:latest"] is fake_ollama.models["later:1"]


def test_plan_serves_the_smallest_gguf_within_the_limits_and_refuses_when_none_is(
    tiny_model: Path, tiny_gguf: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    import yaml

    from tunepipe.tasks.chat.examples import write_jsonl
    from tunepipe.tasks.data.containers import DataSource
    from tunepipe.tasks.data.files import read_file
    from tunepipe.tasks.data.shapes import Normaliser
    from tunepipe.tasks.export.results import ExportResult, ParityVerdict
    from tunepipe.tasks.runtime.base_model import BaseModelRef
    from tunepipe.tasks.runtime.config import PipelineConfig
    from tunepipe.tasks.serve.task import ParityFailed, plan_serving

    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    raw["ollama"]["smoke_examples"] = 3
    cfg = PipelineConfig.model_validate(raw)
    held_out = tmp_path / "eval.jsonl"  # as the data check leaves it: examples with the system prompt added
    write_jsonl(held_out, read_file(DataSource(path=demo_data[1]), Normaliser(None, cfg.data.system_prompt)).examples)
    sizes = {"f16": 300, "q8_0": 200, "q4_k_m": 100}
    exported = ExportResult(
        merged_dir=tiny_model,
        adapter_dir=None,
        adapter_gguf=None,
        ggufs=[GgufFile(type=t, path=tiny_gguf, bytes=size, sha256="0" * 64) for t, size in sizes.items()],
    )
    base = BaseModelRef(name_or_path=str(tiny_model), revision=None, fingerprint="tiny")
    verdicts = [
        ParityVerdict(gguf_type="f16", passed=True, failures=[]),
        ParityVerdict(gguf_type="q8_0", passed=True, failures=[]),
        ParityVerdict(gguf_type="q4_k_m", passed=False, failures=["exact_match: drop 0.1 > 0.02"]),
    ]

    plan = plan_serving(exported, verdicts, base, cfg, "run-1", "f" * 64, held_out, ChatContext())

    assert plan.gguf.type == "q8_0"  # q4_k_m is smaller but over its limit
    assert plan.spec.system == cfg.data.system_prompt
    # 3 held-out examples and the config's probes, each a lone user turn: SYSTEM comes from the Modelfile
    assert [len(c.messages) for c in plan.smoke_cases] == [1] * (3 + len(cfg.eval.probes))
    assert plan.required_keys == ["name", "price", "category", "manufacturer"]
    failing = [v.model_copy(update={"passed": False, "failures": ["stop_rate: drop"]}) for v in verdicts]
    with pytest.raises(ParityFailed, match=r"no GGUF is within the parity limits .*q4_k_m: stop_rate: drop; nothing"):
        plan_serving(exported, failing, base, cfg, "run-1", "f" * 64, held_out, ChatContext())


# --- the nightly path through the serve flow: retries, and what an Ollama that dies leaves behind -----------


def _flaky_plan(gguf: GgufFile, name: str, fake: FakeOllama, mlflow_run, tiny_model: Path) -> ServingPlan:
    from tunepipe.tasks.runtime.config import RetryConfig

    # Three tries, no waiting: the backoff's length is Prefect's business, the outcome is ours.
    return _plan(gguf, name, fake.url, mlflow_run, tiny_model).model_copy(
        update={"retry": RetryConfig(attempts=3, backoff_s=0)}
    )


def _in_step(fake: FakeOllama, uri: str, name: str) -> bool:
    """Whether MLflow's champion and Ollama's NAME:latest are the same model."""
    champion = find_champion(uri, f"pipeline-{name}")
    latest = fake.models.get(f"{name}:latest")
    return latest is not None and champion is not None and latest is fake.models.get(champion.tags["ollama.tag"])


def test_serve_flow_rides_out_ollama_faults_and_registers_once(
    prefect_server, fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from tunepipe.flows.serve import serve

    uri, _ = mlflow_run
    plan = _flaky_plan(obedient_gguf, "flaky", fake_ollama, mlflow_run, tiny_model)
    fake_ollama.fail(f"/api/blobs/sha256:{obedient_gguf.sha256}", "restarting")  # the HEAD asking for the blob
    fake_ollama.fail("/api/create", "answer_lost")  # created, but the run never heard: the retry creates again
    fake_ollama.fail("/api/chat", "killed")
    fake_ollama.fail("/api/copy", "answer_lost")

    served = serve(plan)

    versions = MlflowClient(tracking_uri=uri).search_model_versions("name = 'pipeline-flaky'")
    assert (served.served, [str(v.version) for v in versions], sorted(fake_ollama.models)) == (
        True,
        ["1"],
        ["flaky:1", "flaky:latest"],
    )


@pytest.mark.parametrize(
    ("path", "step"), [("/api/create", "register"), ("/api/chat", "smoke_test"), ("/api/copy", "promote")]
)
def test_ollama_killed_for_good_mid_serve_leaves_the_champion_and_latest_in_step(
    prefect_server, fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path, path: str, step: str
) -> None:
    from tunepipe.flows.serve import serve

    uri, _ = mlflow_run
    name = f"down-{step.replace('_', '-')}"
    first = _flaky_plan(obedient_gguf, name, fake_ollama, mlflow_run, tiny_model)
    serve(first)  # version 1 is the champion
    fake_ollama.fail(path, "killed", "killed", "killed")  # every try of the step meets a dead server

    state = serve(_next_candidate(first), return_state=True)

    assert (
        state.is_failed() and _in_step(fake_ollama, uri, name) and find_champion(uri, f"pipeline-{name}").version == "1"
    )


def test_ollama_killed_after_moving_latest_is_put_in_step_by_the_retry(
    prefect_server, fake_ollama: FakeOllama, obedient_gguf: GgufFile, mlflow_run, tiny_model: Path
) -> None:
    from tunepipe.flows.serve import serve

    uri, _ = mlflow_run
    first = _flaky_plan(obedient_gguf, "moved", fake_ollama, mlflow_run, tiny_model)
    serve(first)
    # NAME:latest moved to version 2, then Ollama died before answering; it comes back for the retry.
    fake_ollama.fail("/api/copy", "answer_lost", "restarting")

    served = serve(_next_candidate(first))

    assert (served.promotion.version, served.promotion.previous, _in_step(fake_ollama, uri, "moved")) == (
        "2",
        "1",
        True,
    )


def test_smoke_test_judges_the_answer_after_the_reasoning_as_the_evaluation_does() -> None:
    from types import SimpleNamespace

    from tunepipe.tasks.serve.task import _answer_problems

    plan = SimpleNamespace(output_format="json", required_keys=["name"])
    assert _answer_problems('<think>\nThe heading.\n</think>\n\n{"name": "Kettle"}', "stop", plan) == []
    assert _answer_problems('The heading.\n</think>\n\n{"name": "Kettle"}', "stop", plan) == []
    assert _answer_problems("<think>\nThe heading.\n</think>\n\nKettle", "stop", plan) == [
        "not a JSON object: '<think>\\nThe heading.\\n</think>\\n\\nKettle'"
    ]
