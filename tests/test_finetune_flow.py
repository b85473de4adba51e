"""End to end: the finetune flow on the tiny model with a real Prefect server, MLflow store, GX and llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deployments.cli import stage_states
from flows.finetune import GateFailed, RunSummary, finetune
from tasks.config import load_config

EXPENSIVE = {"load_data", "check_data", "format_data", "train", "evaluate", "export", "parity"}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: tuple[Path, Path]) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    train, eval_ = demo_data
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config.update(workdir=str(root / "runs"))
    config["data"].update(train=str(train), eval=str(eval_))
    config["model"]["base"] = str(tiny_model)
    config["train"].update(max_steps=20, logging_steps=2)
    config["eval"] = {"max_samples": 8, "max_new_tokens": 24}
    config["gate"] = {"rules": {"eval_loss": {"min_improvement_over_base": 1.0}}}
    config["retrain"] = {"max_attempts": 1}  # the loop has its own tests (test_retrain_loop.py)
    config["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "e2e",
                          "artifact_location": str(root / "mlartifacts")}
    # Nothing listens here, so the run must end "Unserved", with the command that finishes it later.
    config["ollama"]["host"] = "http://127.0.0.1:9"
    config["export"]["max_drop"] = {"valid_json_rate": 1.0}  # a 20-step model: parity is measured, not gated
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def first_run(prefect_server, config_path: Path) -> tuple[RunSummary, dict[str, str]]:
    state = finetune(load_config(config_path), return_state=True)
    assert state.is_completed() and state.name == "Unserved", state.message
    return state.result(), states_by_stage(state)


def states_by_stage(state) -> dict[str, str]:
    return {name: state_name for name, state_name, _ in stage_states(state.state_details.flow_run_id)}


def mlflow_client(config_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=yaml.safe_load(config_path.read_text())["tracking"]["uri"])


def test_first_run_executes_every_stage_and_writes_every_artifact(first_run):
    summary, states = first_run
    assert {stage: states[stage] for stage in EXPENSIVE} == {stage: "Completed" for stage in EXPENSIVE}
    assert states["serve"] == "Completed"  # the subflow: register found no Ollama, so nothing was asked
    assert summary.gate.passed
    exported = summary.exported
    # The demo trains every weight (train.mode full): a whole model, no adapter and no adapter GGUF.
    assert exported.adapter_dir is None and exported.adapter_gguf is None
    assert (exported.merged_dir / "model.safetensors").is_file()
    assert (exported.merged_dir / "chat_template.jinja").is_file()
    assert [g.type for g in exported.ggufs] == ["f16", "q8_0", "q4_k_m"]
    assert all(g.path.read_bytes()[:4] == b"GGUF" and g.bytes > 1_000_000 for g in exported.ggufs)
    assert [g.gguf_type for g in summary.parity.ggufs] == ["f16", "q8_0", "q4_k_m"]
    smallest = min(exported.ggufs, key=lambda g: g.bytes)
    assert summary.gguf_path == smallest.path.resolve()  # every type passed (limits opened above): the smallest
    modelfile = (summary.gguf_path.parent / "Modelfile").read_text()
    system_prompt = yaml.safe_load(Path("configs/demo.yaml").read_text())["data"]["system_prompt"]
    assert f"FROM ./{summary.gguf_path.name}" in modelfile and f'SYSTEM """{system_prompt}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    registration = summary.serving.registration
    assert registration.state == "unreachable" and not summary.serving.served
    assert registration.message.endswith(f"tunepipe register {summary.mlflow_run_id}")
    samples = [json.loads(line) for line in summary.eval.samples_path.open()]
    assert len(samples) == summary.eval.n_samples == 8
    assert summary.eval.candidate.metrics["eval_loss"] < summary.eval.base.metrics["eval_loss"]
    assert summary.data_docs.name == "index.html" and summary.data_docs.is_file()


def test_gguf_greedy_next_token_matches_pytorch(first_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.llama_cpp_tools import load_gguf

    summary, _ = first_run
    tokenizer = AutoTokenizer.from_pretrained(summary.exported.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(summary.exported.merged_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<div><h2>Product: Smart Kettle</h2><p>Price: $25</p></div>"}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        torch_next = int(model(torch.tensor([ids])).logits[0, -1].argmax())

    (f16,) = [g.path for g in summary.exported.ggufs if g.type == "f16"]
    llm = load_gguf(f16, n_ctx=512, logits_all=True)
    # special=True: the chat markers must become their single special tokens, exactly as in transformers.
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    gguf_next = int(llm.scores[len(ids) - 1].argmax())
    llm.close()
    assert gguf_next == torch_next


def test_mlflow_run_holds_config_loss_history_metrics_and_artifacts(first_run, config_path: Path):
    summary, _ = first_run
    client = mlflow_client(config_path)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.params["model.base"] == yaml.safe_load(config_path.read_text())["model"]["base"]
    losses = client.get_metric_history(summary.mlflow_run_id, "train_loss")
    assert [m.step for m in losses] == list(range(2, 21, 2))
    assert losses[-1].value < losses[0].value
    # Logged live to the attempt's child run, step by step while the worker trained (not all at once afterwards).
    (attempt,) = client.search_runs([run.info.experiment_id],
                                    filter_string=f"tags.`mlflow.parentRunId` = '{summary.mlflow_run_id}'")
    live = client.get_metric_history(attempt.info.run_id, "train_loss")
    assert [m.step for m in live] == list(range(2, 21, 2)) and len({m.timestamp for m in live}) > 1
    for name in ("learning_rate", "grad_norm", "tokens_per_s"):
        assert [m.step for m in client.get_metric_history(attempt.info.run_id, name)] == list(range(2, 21, 2))
    # What the environment check decided (the demo config turns recomputation off on the CPU).
    assert attempt.data.tags["train.environment.device"] == "cpu x1"
    assert attempt.data.tags["train.environment.gradient_checkpointing"] == "False"
    assert run.data.tags["train.kind"] == "full"
    assert run.data.metrics["candidate.eval_loss"] == pytest.approx(summary.eval.candidate.metrics["eval_loss"])
    assert run.data.metrics["base.eval_loss"] == pytest.approx(summary.eval.base.metrics["eval_loss"])
    assert run.data.tags["gate"] == "passed"
    assert len(run.data.tags["dataset.fingerprint"]) == 64
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["ollama.state"] == "unreachable"
    for scores in summary.parity.ggufs:
        assert run.data.metrics[f"parity.{scores.gguf_type}.exact_match"] == scores.scores["exact_match"]
    logged = {a.path for folder in ("config", "data_checks", "ollama", "eval", "model", "parity", "serving",
                                    "report") for a in client.list_artifacts(summary.mlflow_run_id, folder)}
    assert {"config/resolved.json", "data_checks/data_check_summary.json", "data_checks/data_docs",
            "ollama/Modelfile", "eval/samples.jsonl", "eval/examples.json", "eval/gate.json", "model/config.json",
            "model/chat_template.jinja", "parity/samples.jsonl", "parity/verdicts.json", "serving/plan.json",
            "report/report.md", "report/loss_curves.png", "report/metrics.png"} <= logged


def test_register_later_serves_the_run_or_leaves_nothing_behind(first_run, config_path: Path, fake_ollama):
    """`tunepipe register RUN_ID` once Ollama answers: registered, asked, and promoted only if every answer passed."""
    from flows.serve import register_run
    from tasks.champion import find_champion

    summary, _ = first_run
    uri = summary.mlflow_tracking_uri
    client = mlflow_client(config_path)
    client.log_text(summary.mlflow_run_id, _with_host(client, summary.mlflow_run_id, fake_ollama.url),
                    "serving/plan.json")

    state = register_run(summary.mlflow_run_id, uri, return_state=True)

    assert fake_ollama.bodies("/api/create")[0]["model"] == "tunepipe-demo:1"
    assert len(fake_ollama.bodies("/api/chat")) == 5  # ollama.smoke_examples
    champion = find_champion(uri, "demo-products")
    if state.is_completed():  # the 20-step model answered parseable JSON and stopped every time
        assert champion.version == "1" and "tunepipe-demo:latest" in fake_ollama.models
    else:
        assert "smoke test of tunepipe-demo:1 failed" in str(state.result(raise_on_failure=False))
        assert champion is None and fake_ollama.models == {}


def _with_host(client, run_id: str, host: str) -> str:
    """The run's logged plan, pointed at the stand-in Ollama (the run itself had none)."""
    from tasks.serve import ServingPlan

    plan = ServingPlan.model_validate_json(Path(client.download_artifacts(run_id, "serving/plan.json")).read_text())
    return plan.model_copy(update={"ollama": plan.ollama.model_copy(update={"host": host})}).model_dump_json()


def test_same_config_again_is_all_cache_hits(first_run, config_path: Path):
    state = finetune(load_config(config_path), return_state=True)
    states = states_by_stage(state)
    assert {stage: states[stage] for stage in EXPENSIVE} == {stage: "Cached" for stage in EXPENSIVE}
    assert state.result().gguf_path == first_run[0].gguf_path
    # The new MLflow run shows the whole training curve although nothing trained.
    losses = mlflow_client(config_path).get_metric_history(state.result().mlflow_run_id, "train_loss")
    assert [m.step for m in losses] == list(range(2, 21, 2))


def test_changing_a_threshold_reuses_training_and_evaluation(first_run, config_path: Path):
    state = finetune(load_config(config_path, ["gate.rules.eval_loss.max=100"]), return_state=True)
    states = states_by_stage(state)
    assert states["train"] == states["evaluate"] == "Cached"
    assert [(c.metric, c.kind) for c in state.result().gate.checks] == [("eval_loss", "max"),
                                                                         ("eval_loss", "over_base")]


def test_deleted_export_folder_is_rebuilt_not_served_from_cache(first_run, config_path: Path):
    import shutil

    summary, _ = first_run
    shutil.rmtree(summary.gguf_path.parent)
    state = finetune(load_config(config_path), return_state=True)
    states = states_by_stage(state)
    assert states["train"] == "Cached" and states["export"] == "Completed"
    assert state.result().gguf_path.is_file()


def test_deleted_data_folders_are_rebuilt_the_same(first_run, config_path: Path):
    import shutil

    workdir = Path(yaml.safe_load(config_path.read_text())["workdir"])
    (formatted,) = (workdir / "format_data").glob("*/train.jsonl")
    before = formatted.read_bytes()
    # The format stage reads the token ids the check wrote: with both folders gone, both stages run again.
    shutil.rmtree(workdir / "check_data")
    shutil.rmtree(workdir / "format_data")
    states = states_by_stage(finetune(load_config(config_path), return_state=True))
    assert (states["check_data"], states["format_data"], states["train"]) == ("Completed", "Completed", "Cached")
    assert formatted.read_bytes() == before


def test_failed_gate_exports_nothing_and_marks_the_mlflow_run(first_run, config_path: Path):
    state = finetune(load_config(config_path, ["gate.rules.exact_match.min=1.0"]), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GateFailed)
    assert "exact_match is 0, below the minimum 1" in str(error) and str(error) in state.message
    assert "export" not in states_by_stage(state)
    run = mlflow_client(config_path).get_run(error.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags["gate"] == "failed"
