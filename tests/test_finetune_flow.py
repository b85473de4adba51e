"""End to end: the finetune flow on the tiny model with a real Prefect server, MLflow store, GX and llama.cpp."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tunepipe.deployments.output import stage_states
from tunepipe.flows.finetune import GateFailed, RunSummary, finetune, outcome
from tunepipe.tasks.runtime.config import load_config

pytestmark = pytest.mark.slow  # runs the finetune flow end to end

EXPENSIVE = {"load_data", "check_data", "format_data", "train", "evaluate", "export", "parity"}


@pytest.fixture(scope="module", name="config_path")
def fixture_config_path(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: tuple[Path, Path]
) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    train, eval_ = demo_data
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config.update(workdir=str(root / "runs"))
    config["data"].update(train=str(train), eval=str(eval_))
    config["model"]["base"] = str(tiny_model)
    # The tiny model learns only when every weight trains (the demo itself fine-tunes SmolLM2 with LoRA).
    config["train"].update(
        mode="full",
        max_steps=20,
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=16,
        warmup_steps=20,
        logging_steps=2,
        eval_steps=10,
    )  # held-out loss at steps 10 and 20
    config["eval"] = {"max_samples": 8, "max_new_tokens": 24, "retention": {"builtin": 2, "max_new_tokens": 8}}
    # The tiny model says no word retention could score (tests/test_retention.py measures it): not gated here.
    config["gate"] = {"rules": {"eval_loss": {"min_improvement_over_base": 1.0}}, "retention": None}
    config["retrain"] = {"max_attempts": 1}  # the loop has its own tests (test_retrain_loop.py)
    config["tracking"] = {
        "uri": f"sqlite:///{root}/mlflow.db",
        "experiment": "e2e",
        "artifact_location": str(root / "mlartifacts"),
    }
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
    # Every weight trained (train.mode full): a whole model, no adapter and no adapter GGUF.
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


def test_training_and_evaluation_ran_in_workers_started_before_their_stages(first_run, config_path: Path):
    """The training worker starts with the flow, the evaluation worker with training: each took its request
    after importing its stack, so the stages did not wait for it (tasks/runtime/worker.py, spares). The test
    split's evaluation, after the loop, starts its own."""
    summary, _ = first_run
    workdir = Path(yaml.safe_load(config_path.read_text())["workdir"])
    assert len([*workdir.glob("evaluate/*/worker/worker.log")]) == 2  # on validation, then on test
    # The evaluation on validation follows training: its worker is the one training started.
    logs = [*workdir.glob("train/*/worker.log"), summary.validation.samples_path.parent / "worker" / "worker.log"]
    assert len(logs) == 2
    for log in logs:
        assert "(prestart_worker), its imports done while the stages before ran" in log.read_text().splitlines()[0]


def test_the_workers_lines_reach_the_runs_log(first_run, config_path: Path):
    """What the training and evaluation workers print is in the flow run's log (the Prefect UI), not only in
    their worker.log files: each model's evaluation, its answers and seconds, among it."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    summary, _ = first_run
    APILogHandler().flush()
    flow_run_id = UUID(mlflow_client(config_path).get_run(summary.mlflow_run_id).data.tags["prefect.flow_run_id"])
    messages, page = [], 200  # the API's most logs a read
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=page, offset=len(messages)
            )
            messages += [log.message for log in logs]
            if len(logs) < page:
                break
    for worker in ("tunepipe.tasks.train.loop:train_model", "tunepipe.tasks.evaluate.worker:generate_outputs"):
        assert any(m.startswith(f"worker for {worker}: started") for m in messages), worker
    assert any(m.startswith("train: ") for m in messages)
    for model in ("candidate", "base"):
        assert any(m.startswith(f"evaluate: {model}: ") and " answers in " in m for m in messages), model


def test_gguf_greedy_next_token_matches_pytorch(first_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.integrations.llama_cpp import load_gguf

    summary, _ = first_run
    tokenizer = AutoTokenizer.from_pretrained(summary.exported.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(summary.exported.merged_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<div><h2>Product: Smart Kettle</h2><p>Price: $25</p></div>"}],
        tokenize=False,
        add_generation_prompt=True,
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
    (attempt,) = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary.mlflow_run_id}'"
    )
    live = client.get_metric_history(attempt.info.run_id, "train_loss")
    assert [m.step for m in live] == list(range(2, 21, 2)) and len({m.timestamp for m in live}) > 1
    for name in ("learning_rate", "grad_norm", "tokens_per_s"):
        assert [m.step for m in client.get_metric_history(attempt.info.run_id, name)] == list(range(2, 21, 2))
    # What the environment check decided (the demo config turns recomputation off on the CPU).
    assert attempt.data.tags["train.environment.device"] == "cpu x1"
    assert attempt.data.tags["train.environment.gradient_checkpointing"] == "False"
    assert run.data.tags["train.kind"] == "full"
    assert run.data.metrics["candidate.eval_loss"] == pytest.approx(summary.eval.candidate.metrics["eval_loss"])
    # The held-out curve beside the training loss, and the step whose weights were evaluated: the evaluate
    # stage measures on them the loss the curve has at that step.
    curve = {m.step: m.value for m in client.get_metric_history(attempt.info.run_id, "eval_loss")}
    assert sorted(curve) == [10, 20]
    selected = int(attempt.data.tags["train.selected_step"])
    assert selected == min(curve, key=curve.get)
    assert attempt.data.tags["train.selection"].startswith(f"train.select=best: step {selected} (eval_loss")
    assert summary.validation.candidate.metrics["eval_loss"] == pytest.approx(curve[selected], rel=1e-4)
    assert run.data.metrics["base.eval_loss"] == pytest.approx(summary.eval.base.metrics["eval_loss"])
    # Validation beside test: the test scores under the names they always had.
    assert (summary.validation.split, summary.eval.split) == ("validation", "test")
    for who in ("base", "candidate"):
        assert run.data.metrics[f"validation.{who}.eval_loss"] == pytest.approx(
            getattr(summary.validation, who).metrics["eval_loss"]
        )
    assert summary.validation.candidate.metrics["eval_loss"] != pytest.approx(
        summary.eval.candidate.metrics["eval_loss"]
    )
    assert "| metric | base validation | base test | candidate validation | candidate test |" in (
        summary.report.path.read_text()
    )
    assert run.data.tags["gate"] == "passed"
    assert len(run.data.tags["dataset.fingerprint"]) == 64
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["ollama.state"] == "unreachable"
    for scores in summary.parity.ggufs:
        assert run.data.metrics[f"parity.{scores.gguf_type}.exact_match"] == scores.scores["exact_match"]
    logged = {
        a.path
        for folder in ("config", "data_checks", "ollama", "eval", "model", "parity", "serving", "report")
        for a in client.list_artifacts(summary.mlflow_run_id, folder)
    }
    assert {
        "config/resolved.json",
        "data_checks/data_check_summary.json",
        "data_checks/data_docs",
        "ollama/Modelfile",
        "eval/samples.jsonl",
        "eval/examples.json",
        "eval/gate.json",
        "eval/validation",
        "model/config.json",
        "model/chat_template.jinja",
        "parity/samples.jsonl",
        "parity/verdicts.json",
        "serving/plan.json",
        "report/report.md",
        "report/loss_curves.png",
        "report/metrics.png",
    } <= logged


def test_the_test_split_is_read_by_the_final_evaluation_alone(first_run, config_path: Path):
    """Training chose its checkpoint on validation and the attempt was judged there; the test rows reached one
    evaluation, the final one, whose report is the one the gate decided on."""
    from tunepipe.tasks.chat.examples import read_examples

    summary, _ = first_run
    workdir = Path(yaml.safe_load(config_path.read_text())["workdir"])
    checked = summary.data_docs.parent.parent  # the check stage's folder
    validation = {e.id for e in read_examples(checked / "validation_clean.jsonl")}
    test = {e.id for e in read_examples(checked / "eval_clean.jsonl")}
    assert validation and test and not validation & test
    (request,) = [json.loads(p.read_text()) for p in (workdir / "train").glob("*/worker-request.json")]
    assert request["held_out"]["examples"] == str(checked / "validation_clean.jsonl")
    answered = {
        path: {json.loads(line)["id"] for line in path.read_text().splitlines()}
        for path in (workdir / "evaluate").glob("*/samples.jsonl")
    }
    assert [path for path, ids in answered.items() if ids & test] == [summary.eval.samples_path]
    assert answered[summary.validation.samples_path] <= validation
    assert len(answered) == 2


def test_train_and_eval_rows_are_the_runs_dataset_inputs(first_run, config_path: Path):
    import hashlib
    from urllib.parse import urlparse

    summary, _ = first_run
    run = mlflow_client(config_path).get_run(summary.mlflow_run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {
        "demo-products-train": "training",
        "demo-products-validation": "validation",
        "demo-products-eval": "evaluation",
    }
    for split in ("train", "validation", "eval"):
        d = inputs[f"demo-products-{split}"]
        profile = json.loads(d.dataset.profile)
        assert profile["fingerprint"] == run.data.tags["dataset.fingerprint"]
        assert profile["num_rows"] == run.data.metrics[f"data.rows_clean_{split}"]
        clean = Path(urlparse(json.loads(d.dataset.source)["uri"]).path)  # the checked rows, in the stage folder
        assert d.dataset.digest == hashlib.sha256(clean.read_bytes()).hexdigest()[:16]


def test_register_later_removes_a_model_that_fails_the_smoke_test(first_run, config_path: Path, fake_ollama):
    """`tunepipe register RUN_ID` once Ollama answers; one token per answer cannot end by a stop: not promoted."""
    from tunepipe.flows.serve import register_run
    from tunepipe.tasks.integrations.model_registry import find_champion

    summary, _ = first_run
    client = mlflow_client(config_path)
    with _pointed_plan(client, summary.mlflow_run_id, host=fake_ollama.url, max_new_tokens=1):
        state = register_run(summary.mlflow_run_id, summary.mlflow_tracking_uri, return_state=True)

    assert state.is_failed()
    assert "smoke test of tunepipe-demo:1 failed" in str(state.result(raise_on_failure=False))
    assert len(fake_ollama.bodies("/api/chat")) == 5  # ollama.smoke_examples, each asked
    assert find_champion(summary.mlflow_tracking_uri, "demo-products") is None and fake_ollama.models == {}


def test_same_config_again_is_all_cache_hits(first_run, config_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tunepipe.flows.finetune
    from tunepipe.tasks.runtime import worker

    # The training spare the flow started went unused (train was cached): stopped once the retrain loop ends,
    # before the stages after it, not when the flow ends.
    spares_after_the_loop = []
    monkeypatch.setattr(
        tunepipe.flows.finetune,
        "outcome",
        lambda *args: spares_after_the_loop.append([spare.target for spare in worker._spares]) or outcome(*args),
    )
    state = finetune(load_config(config_path), return_state=True)
    states = states_by_stage(state)
    assert {stage: states[stage] for stage in EXPENSIVE} == {stage: "Cached" for stage in EXPENSIVE}
    assert spares_after_the_loop == [[]]
    assert state.result().gguf_path == first_run[0].gguf_path
    # The new MLflow run shows the whole training curve although nothing trained.
    losses = mlflow_client(config_path).get_metric_history(state.result().mlflow_run_id, "train_loss")
    assert [m.step for m in losses] == list(range(2, 21, 2))


def test_changing_a_threshold_reuses_training_and_evaluation(first_run, config_path: Path):
    state = finetune(load_config(config_path, ["gate.rules.eval_loss.max=100"]), return_state=True)
    states = states_by_stage(state)
    assert states["train"] == states["evaluate"] == "Cached"
    assert [(c.metric, c.kind) for c in state.result().gate.checks] == [
        ("eval_loss", "max"),
        ("eval_loss", "over_base"),
    ]


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


def test_changing_a_parity_limit_re_decides_without_re_exporting(first_run, config_path: Path):
    # A limit no GGUF can meet (stop rate must rise by 2): the verdicts change, the exported files do not.
    state = finetune(load_config(config_path, ["export.max_drop={stop_rate: -2.0}"]), return_state=True)
    states = states_by_stage(state)
    assert (states["export"], states["parity"]) == ("Cached", "Cached")
    assert state.is_failed() and "no GGUF is within the parity limits" in state.message


def test_evaluate_flow_scores_the_fully_fine_tuned_run(first_run, config_path: Path):
    """`tunepipe evaluate CONFIG RUN` on an exported full fine-tune: its weights come from the run's `model`."""
    from tunepipe.flows.evaluate import evaluate_model

    summary, _ = first_run
    evaluation = evaluate_model(load_config(config_path), summary.mlflow_run_id)
    assert evaluation.model_run_id == summary.mlflow_run_id and evaluation.gate.passed
    assert evaluation.eval.candidate.metrics["eval_loss"] == pytest.approx(summary.eval.candidate.metrics["eval_loss"])


def test_evaluate_flow_scores_an_unexported_full_run_from_its_train_folder(first_run, config_path: Path):
    from tunepipe.flows.evaluate import evaluate_model

    summary, _ = first_run
    failed = finetune(load_config(config_path, ["gate.rules.exact_match.min=1.0"]), return_state=True)
    run_id = failed.result(raise_on_failure=False).mlflow_run_id
    evaluation = evaluate_model(load_config(config_path), run_id)
    assert evaluation.model_run_id == run_id
    assert evaluation.eval.candidate.metrics["eval_loss"] == pytest.approx(summary.eval.candidate.metrics["eval_loss"])


def test_register_later_serves_the_run(first_run, config_path: Path, fake_ollama, obedient_gguf):
    """The run's logged plan, its GGUF swapped for one that answers `{}` and stops (so no keys are asked of it):
    registered, asked, promoted.
    Last in this module: a champion makes every later run's evaluation score it too (no cache hits)."""
    from tunepipe.flows.serve import register_run
    from tunepipe.tasks.integrations.model_registry import find_champion

    summary, _ = first_run
    client = mlflow_client(config_path)
    with _pointed_plan(client, summary.mlflow_run_id, host=fake_ollama.url, gguf=obedient_gguf, required_keys=[]):
        serving = register_run(summary.mlflow_run_id, summary.mlflow_tracking_uri)

    tag = serving.registration.ollama_tag
    assert fake_ollama.bodies("/api/create")[0]["model"] == tag
    assert serving.smoke.passed and len(fake_ollama.bodies("/api/chat")) == 5
    champion = find_champion(summary.mlflow_tracking_uri, "demo-products")
    assert champion.version == serving.registration.version
    assert set(fake_ollama.models) == {tag, "tunepipe-demo:latest"}


@contextmanager
def _pointed_plan(client, run_id: str, host: str, **changes):
    """The run's logged plan rewritten: pointed at the stand-in Ollama (the run itself had none), and `changes`;
    put back as the run logged it afterwards, so one test's changes never reach the next."""
    from tunepipe.tasks.serve.results import ServingPlan

    logged = Path(client.download_artifacts(run_id, "serving/plan.json")).read_text()
    plan = ServingPlan.model_validate_json(logged)
    plan = plan.model_copy(update={"ollama": plan.ollama.model_copy(update={"host": host}), **changes})
    client.log_text(run_id, plan.model_dump_json(), "serving/plan.json")
    try:
        yield
    finally:
        client.log_text(run_id, logged, "serving/plan.json")
