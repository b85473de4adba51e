"""Serve what passed: register the chosen GGUF in Ollama, ask it through /api/chat, then promote it.

`plan_serving` picks the GGUF (the smallest one within the parity limits), writes its Modelfile and the
adapter route's, and gathers the smoke-test conversations; the plan is logged to the MLflow run
(`serving/plan.json`), so a run that found no Ollama can be finished later with `tunepipe register RUN_ID`.
Then: `register` makes a new MLflow model version and `NAME:VERSION` in Ollama; `smoke_test` asks it the
smoke conversations (each answer must parse as the task demands and end by a stop, not the length limit);
only then `promote` moves `NAME:latest` and the alias `champion` together (tasks/integrations/model_registry.py).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from prefect import task

from tunepipe.tasks.chat.examples import read_examples, split_reasoning
from tunepipe.tasks.chat.metrics import parse_json_object, required_keys
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.export.results import ExportResult, ParityVerdict
from tunepipe.tasks.integrations.model_registry import ChampionMove, register_version, tag_version
from tunepipe.tasks.integrations.model_registry import promote as promote_version
from tunepipe.tasks.integrations.ollama.client import OllamaClient, OllamaError
from tunepipe.tasks.integrations.ollama.host import DEFAULT_HOST, ollama_host
from tunepipe.tasks.integrations.ollama.modelfile import client_messages, modelfile_spec
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.config import PipelineConfig
from tunepipe.tasks.runtime.records import Record
from tunepipe.tasks.serve.results import PLAN_ARTIFACT, Registration, ServingPlan, SmokeCase, SmokeReport, SmokeResult


class ParityFailed(RuntimeError):
    def __init__(self, verdicts: list[ParityVerdict], mlflow_run_id: str):
        lines = "; ".join(f"{v.gguf_type}: {', '.join(v.failures)}" for v in verdicts)
        super().__init__(
            f"no GGUF is within the parity limits (export.max_drop): {lines}; "
            f"nothing registered (MLflow run {mlflow_run_id})"
        )
        self.verdicts = verdicts


class SmokeTestFailed(RuntimeError):
    def __init__(self, registration: Registration, report: SmokeReport):
        super().__init__(
            f"smoke test of {registration.ollama_tag} failed ({report.summary()}); "
            "it was removed from Ollama and the champion is unchanged"
        )
        self.report = report


def plan_serving(
    exported: ExportResult,
    verdicts: list[ParityVerdict],
    base: BaseModelRef,
    cfg: PipelineConfig,
    run_id: str,
    dataset_fingerprint: str,
    eval_examples: Path,
    chat: ChatContext,
) -> ServingPlan:
    """The GGUF to serve (smallest within the parity limits), its Modelfiles (derived under training's `chat`
    context), and the smoke conversations."""
    passed = {v.gguf_type for v in verdicts if v.passed}
    if not passed:
        raise ParityFailed(verdicts, run_id)
    gguf = min((g for g in exported.ggufs if g.type in passed), key=lambda g: g.bytes)
    # Absolute: `tunepipe register RUN_ID` may run from another folder than the flow did.
    gguf = gguf.model_copy(update={"path": gguf.path.resolve()})
    examples = list(read_examples(eval_examples))
    smoked = examples[: cfg.ollama.smoke_examples]
    # The conversations the smoke test sends join the proof that Ollama renders them as training did.
    spec = modelfile_spec(
        gguf.path,
        exported.merged_dir,
        **cfg.ollama.modelfile_settings(),
        trained_system=cfg.data.system_prompt,
        examples=[[m.model_dump() for m in ex.prompt] for ex in smoked],
        chat=chat,
    )
    modelfile = spec.write(gguf.path.parent / "Modelfile")
    adapter_base = cfg.ollama.adapter_base or (base.name_or_path if Path(base.name_or_path).is_dir() else None)
    if exported.adapter_gguf is not None and adapter_base is not None:
        spec.model_copy(update={"adapter": exported.adapter_gguf, "base": adapter_base}).write(
            gguf.path.parent / "Modelfile.adapter"
        )
    # `eval.probes`: the fixed prompts the evaluation also asks base, champion and candidate.
    probes = [
        SmokeCase(name=f"probe {i}", messages=[{"role": "user", "content": probe}])
        for i, probe in enumerate(cfg.eval.probes)
    ]
    cases = probes + [
        SmokeCase(name=f"held-out {ex.source}:{ex.line}", messages=client_messages(ex.prompt, spec.system))
        for ex in smoked
    ]
    return ServingPlan(
        run_id=run_id,
        tracking_uri=cfg.tracking.uri,
        registered_model=cfg.name,
        dataset_fingerprint=dataset_fingerprint,
        gguf=gguf,
        spec=spec,
        modelfile=modelfile,
        ollama=cfg.ollama,
        output_format=cfg.data.output_format,
        max_new_tokens=cfg.eval.max_new_tokens,
        smoke_cases=cases,
        retry=cfg.retry,
        required_keys=required_keys(ex.answer for ex in examples) if cfg.data.output_format == "json" else [],
    )


def register_candidate(plan: ServingPlan) -> Registration:
    """A new MLflow model version and `NAME:VERSION` in Ollama; nothing at all when Ollama does not answer."""
    host = ollama_host(plan.ollama.host)
    client = OllamaClient(host, plan.ollama.timeout_s)
    if not client.reachable():
        env = "" if host == DEFAULT_HOST else f"OLLAMA_HOST={shlex.quote(host)} "
        message = (
            f"not served: Ollama not reachable at {host}; every artifact is kept and the champion is "
            f"unchanged. When it answers, finish with: {env}tunepipe register {plan.run_id}"
        )
        _tag_run(plan, {"ollama.state": "unreachable"})
        return Registration(state="unreachable", message=message, host=host)

    version = register_version(
        plan.tracking_uri,
        plan.registered_model,
        plan.run_id,
        {
            "dataset.fingerprint": plan.dataset_fingerprint,
            "gguf.sha256": plan.gguf.sha256,
            "gguf.type": plan.gguf.type,
        },
    )
    tag = f"{plan.ollama.model_name}:{version}"
    digest = client.push_blob(plan.gguf.path, f"sha256:{plan.gguf.sha256}")
    client.create(
        tag,
        files={plan.gguf.path.name: digest},
        template=plan.spec.template,
        system=plan.spec.system,
        parameters=plan.spec.api_parameters(),
    )
    shown = client.show(tag)
    if shown.template != plan.spec.template:
        raise OllamaError(f"{tag!r} was created at {host} but reports a different template than sent")
    tag_version(plan.tracking_uri, plan.registered_model, version, {"ollama.tag": tag})
    _tag_run(plan, {"ollama.state": "registered", "ollama.tag": tag, "mlflow.model_version": version})
    return Registration(
        state="registered",
        host=host,
        version=version,
        ollama_tag=tag,
        message=f"registered {tag} at {host} from {plan.gguf.path.name} ({plan.gguf.type})",
    )


def smoke_test_model(plan: ServingPlan, registration: Registration) -> SmokeReport:
    """Ask the registered model each smoke conversation; a failure removes it from Ollama and raises."""
    client = OllamaClient(registration.host, plan.ollama.timeout_s)
    options = {"temperature": 0, "num_predict": plan.max_new_tokens}
    results = []
    for case in plan.smoke_cases:
        reply = client.chat(registration.ollama_tag, case.messages, options)
        answer = reply.message.content or ""
        results.append(
            SmokeResult(
                case=case.name,
                answer=answer,
                done_reason=reply.done_reason,
                problems=_answer_problems(answer, reply.done_reason, plan),
            )
        )
    report = SmokeReport(results=results)
    tag_version(
        plan.tracking_uri,
        plan.registered_model,
        registration.version,
        {"smoke_test": "passed" if report.passed else "failed"},
    )
    _tag_run(plan, {"smoke_test": report.summary()[:5000]})
    if not report.passed:
        client.delete(registration.ollama_tag)  # never leave a model that failed the test where it can be used
        raise SmokeTestFailed(registration, report)
    return report


def _answer_problems(answer: str, done_reason: str | None, plan: ServingPlan) -> list[str]:
    problems = [] if done_reason == "stop" else [f"ended by {done_reason!r}, not by a stop"]
    if plan.output_format == "json":
        parsed = parse_json_object(split_reasoning(answer)[1])  # judged as the evaluation judges it
        if parsed is None:
            problems.append(f"not a JSON object: {answer[:120]!r}")
        elif missing := [key for key in plan.required_keys if key not in parsed]:
            problems.append(f"missing keys {missing}")
    elif not answer.strip():
        problems.append("empty answer")
    return problems


def promote_candidate(plan: ServingPlan, registration: Registration) -> ChampionMove:
    client = OllamaClient(registration.host, plan.ollama.timeout_s)
    move = promote_version(plan.tracking_uri, plan.registered_model, registration.version, client)
    _tag_run(plan, {"champion": f"{move.name} v{move.version}"})
    return move


def load_plan(tracking_uri: str, run_id: str) -> ServingPlan:
    """The serving plan a finetune run logged, for `tunepipe register RUN_ID`."""
    from mlflow.tracking import MlflowClient

    path = MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, PLAN_ARTIFACT)
    plan = ServingPlan.model_validate_json(Path(path).read_text(encoding="utf-8"))
    return plan.model_copy(update={"tracking_uri": tracking_uri})  # the logged one is masked


def _tag_run(plan: ServingPlan, tags: dict[str, str]) -> None:
    """What serving did, on the run that trained the model."""
    from tunepipe.tasks.runtime.tracking import RunWriter

    RunWriter(plan.tracking_uri, plan.run_id, plan.registered_model).record(Record(tags=tags))


# Not cached: each depends on the Ollama server and the model registry, not on our inputs alone.
@task(name="register")
def register(plan: ServingPlan) -> Registration:
    return register_candidate(plan)


@task(name="smoke_test")
def smoke_test(plan: ServingPlan, registration: Registration) -> SmokeReport:
    return smoke_test_model(plan, registration)


@task(name="promote")
def promote(plan: ServingPlan, registration: Registration) -> ChampionMove:
    return promote_candidate(plan, registration)


@task(name="plan_serving")
def plan(
    exported: ExportResult,
    verdicts: list[ParityVerdict],
    base: BaseModelRef,
    cfg: PipelineConfig,
    run_id: str,
    dataset_fingerprint: str,
    eval_examples: Path,
    chat: ChatContext,
) -> ServingPlan:
    return plan_serving(exported, verdicts, base, cfg, run_id, dataset_fingerprint, eval_examples, chat)
