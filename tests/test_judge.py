"""The judge (tasks/evaluate/judge.py, its prompts and verdicts in judge_protocol.py): a real model answers as
judge, SmolLM2-135M-Instruct's GGUF, served once by the stand-in Ollama (tests/fake_ollama.py, llama.cpp behind
/api/chat) and once by llama-cpp-python's own OpenAI-compatible server that tunepipe starts. At 135M its verdicts
are poor: these tests prove the protocol (both orders asked, flips counted as ties, the format restated, caching,
faults, the gate reading the metric), not the judge's taste."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from conftest import closed_port
from fake_ollama import FakeOllama

from tunepipe.tasks.chat.examples import Example, Message
from tunepipe.tasks.evaluate.gate import decide
from tunepipe.tasks.evaluate.judge import JudgeError, judge_report
from tunepipe.tasks.evaluate.judge_protocol import PAIRWISE_RESTATED, SCHEMAS, pairwise_result, parse_verdict
from tunepipe.tasks.evaluate.report import _judge_losses
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores
from tunepipe.tasks.runtime.caching import stable_hash
from tunepipe.tasks.runtime.config import ConfigError, EvalConfig, GateConfig, JudgeConfig, MetricRule, load_config
from tunepipe.tasks.runtime.retries import is_transient

SYSTEM = "Answer the customer's question in one sentence, from the context only."
WRONG = "I am not sure, please contact support."
GATE = GateConfig(rules={"judge_win_rate": {"min": 0.5}})


@pytest.mark.parametrize(
    ("reply", "mode", "verdict"),
    [
        ("A is more accurate.\n[[A]]", "pairwise", "A"),
        ("Both say it. [[C]]", "pairwise", "C"),
        ("First I thought [[A]], but on reflection [[B]]", "pairwise", "B"),  # the last mark is the verdict
        ('{"verdict": "B"}', "pairwise", "B"),
        ('Sure: {"verdict": "c"}', "pairwise", "C"),
        ("B", "pairwise", "B"),
        ("Assistant A.", "pairwise", "A"),
        ("Both answers are fine.", "pairwise", None),
        ("[[D]]", "pairwise", None),
        ("Mostly right. [[4]]", "rubric", "4"),
        ('{"score": 2}', "rubric", "2"),
        ("5", "rubric", "5"),
        ("[[7]]", "rubric", None),
        ("", "rubric", None),
    ],
)
def test_verdicts_are_read_from_marks_json_or_a_bare_answer(reply: str, mode: str, verdict: str | None) -> None:
    assert parse_verdict(reply, mode) == verdict


@pytest.mark.parametrize(
    ("as_a", "as_b", "result", "value"),
    [
        ("A", "B", "win", 1.0),  # the candidate's answer preferred in both positions
        ("B", "A", "loss", 0.0),
        ("C", "C", "tie", 0.5),
        ("A", "A", "flip", 0.5),  # the first position preferred both times: the order decided, not the answer
        ("B", "B", "flip", 0.5),
        ("A", "C", "flip", 0.5),
        (None, "B", "unread", 0.5),
    ],
)
def test_a_verdict_counts_only_when_it_holds_in_both_orders(as_a, as_b, result: str, value: float) -> None:
    assert pairwise_result(as_a, as_b) == (result, value)


def test_judge_config_forms_and_the_metric_names_the_gate_may_use(tmp_path: Path) -> None:
    assert EvalConfig.model_validate({"judge": "ollama:qwen2.5:7b"}).judge == JudgeConfig(model="ollama:qwen2.5:7b")
    with pytest.raises(ValueError, match="needs base_url"):
        JudgeConfig(model="openai:gpt-4o-mini")
    with pytest.raises(ValueError, match="expected ollama:NAME, openai:MODEL or a .gguf file"):
        JudgeConfig(model="qwen2.5:7b")
    # Changing the judge never invalidates the evaluation's answers.
    assert stable_hash(EvalConfig()) == stable_hash(EvalConfig(judge="ollama:qwen2.5:7b"))

    base = tmp_path / "c.yaml"
    base.write_text(
        "name: t\ndata: {train: d.jsonl, output_format: text}\nmodel: {base: m}\n"
        "ollama: {model_name: t}\ngate: {rules: {judge_win_rate: {min: 0.5}}}\n"
    )
    with pytest.raises(ConfigError, match=r"unknown metric 'judge_win_rate'.*set eval.judge"):
        load_config(base)
    assert load_config(base, ["eval.judge=ollama:qwen2.5:7b"]).eval.judge.metric == "judge_win_rate"
    with pytest.raises(ConfigError, match="judge_win_rate is written in eval.judge.mode pairwise"):
        load_config(base, ['eval.judge={model: "ollama:q", mode: rubric}'])
    # The judge measures the report the gate reads, not the attempts the retrain loop compares.
    with pytest.raises(ConfigError, match="retrain.metric: unknown metric 'judge_win_rate'"):
        load_config(base, ["eval.judge=ollama:q", "retrain.metric=judge_win_rate"])


def _evaluated(root: Path, answers: dict[str, list[str]]) -> tuple[EvalReport, Path]:
    """An evaluation's report over the first prose examples of configs/rag-prose, with these answers per model,
    and the examples file it was made from."""
    n = len(answers["candidate"])
    rows = [json.loads(line) for line in Path("configs/rag-prose/eval.jsonl").read_text().splitlines()[:n]]
    examples = [
        Example(
            id=f"ex{i}",
            source="eval.jsonl",
            line=i + 1,
            messages=[Message(role="system", content=SYSTEM), *map(Message.model_validate, row["messages"])],
        )
        for i, row in enumerate(rows)
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "eval.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in examples))
    scores = {who: [float(a == e.answer) for a, e in zip(said, examples)] for who, said in answers.items()}
    with (root / "samples.jsonl").open("w") as out:
        for i, example in enumerate(examples):
            out.write(
                json.dumps(
                    {
                        "id": example.id,
                        "source": f"eval.jsonl:{i + 1}",
                        "prompt": example.prompt[-1].content,
                        "expected": example.answer,
                        **{
                            who: {"answer": said[i], "stopped": True, "scores": {"exact_match": scores[who][i]}}
                            for who, said in answers.items()
                        },
                    }
                )
                + "\n"
            )
    (root / "probes.jsonl").write_text("")
    models = {
        who: ModelScores(name=who, version="3" if who == "champion" else None, metrics={"exact_match": sum(s) / n})
        for who, s in scores.items()
    }
    return EvalReport(
        n_samples=n,
        candidate=models["candidate"],
        base=models["base"],
        champion=models.get("champion"),
        samples_path=root / "samples.jsonl",
        probes_path=root / "probes.jsonl",
    ), root / "eval.jsonl"


def _answers(n: int = 2) -> list[str]:
    rows = [json.loads(line) for line in Path("configs/rag-prose/eval.jsonl").read_text().splitlines()[:n]]
    return [row["messages"][-1]["content"] for row in rows]


@pytest.fixture
def ollama_judge(fake_ollama: FakeOllama, smollm2) -> str:
    """SmolLM2-135M-Instruct registered in the stand-in Ollama as a user's `ollama create` would: its GGUF with the
    TEMPLATE derived from its chat template."""
    from tunepipe.tasks.integrations.ollama.client import OllamaClient
    from tunepipe.tasks.integrations.ollama.modelfile import modelfile_spec
    from tunepipe.tasks.model.packaged import packaged_gguf

    gguf = packaged_gguf("smollm2-135m-instruct")
    spec = modelfile_spec(gguf, Path(smollm2.name_or_path))
    client = OllamaClient(fake_ollama.url, timeout_s=60)
    client.create(
        "smollm2-judge:135m",
        files={gguf.name: client.push_blob(gguf)},
        template=spec.template,
        system=spec.system,
        parameters=spec.api_parameters(),
    )
    return "ollama:smollm2-judge:135m"


@pytest.mark.slow  # a real model judges through llama.cpp
def test_pairwise_through_ollama_asks_both_orders_caches_and_feeds_the_gate(
    fake_ollama: FakeOllama, ollama_judge: str, tmp_path: Path
) -> None:
    right = _answers()
    report, examples = _evaluated(tmp_path / "eval", {"candidate": [right[0], WRONG], "base": [WRONG, right[1]]})
    # At 135M the judge may prefer a position whatever stands there: flips are allowed, to see them counted.
    cfg = JudgeConfig(model=ollama_judge, base_url=fake_ollama.url, structured=True, max_tokens=12, max_order_flips=1)
    cache = tmp_path / "cache"
    judged = judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", cache)

    asked = fake_ollama.bodies("/api/chat")
    assert len(asked) == 4 and judged.judge.questions == judged.judge.asked == 4
    for i, (first, second) in enumerate((asked[0:2], asked[2:4])):
        # The same question, the two answers in both positions; the reply constrained to a verdict.
        mine, theirs = [right[0], WRONG][i], [WRONG, right[1]][i]
        assert _between(first["messages"][-1]["content"]) == [mine, theirs]
        assert _between(second["messages"][-1]["content"]) == [theirs, mine]
        assert first["format"] == second["format"] == SCHEMAS["pairwise"]
        assert first["options"] == second["options"] == {"temperature": 0, "num_predict": 12}
    assert "[Question]\nContext:\n[" in asked[0]["messages"][-1]["content"]  # the retrieved context is shown
    assert f"[System prompt]\n{SYSTEM}" in asked[0]["messages"][-1]["content"]

    rows = [json.loads(line) for line in judged.judge.judgments_path.read_text().splitlines()]
    samples = [json.loads(line) for line in judged.samples_path.read_text().splitlines()]
    for row, sample in zip(rows, samples):
        verdicts = [j["verdict"] for j in row["judgments"]]
        assert all(v in {"A", "B", "C"} for v in verdicts)  # structured: always readable
        result, value = pairwise_result(*verdicts)
        assert (row["result"], sample["candidate"]["scores"]["judge_win_rate"]) == (result, value)
        assert sample["base"]["scores"]["judge_win_rate"] == 1 - value
        assert sample["candidate"]["scores"]["exact_match"] in (0.0, 1.0)  # the evaluation's scores stay
        assert [len(j["replies"]) for j in row["judgments"]] == [1, 1] and row["judgments"][0]["messages"]
    mean = sum(s["candidate"]["scores"]["judge_win_rate"] for s in samples) / 2
    assert judged.candidate.metrics == {"exact_match": 0.5, "judge_win_rate": mean}
    assert judged.base.metrics["judge_win_rate"] == 1 - mean
    assert judged.judge.digest == fake_ollama.models["smollm2-judge:135m"]["files"]["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert judged.judge.wins + judged.judge.ties + judged.judge.losses + judged.judge.order_flips == 2

    # The gate reads it like any metric.
    check = decide(judged, GATE).checks[0]
    assert (check.metric, check.value, check.passed) == ("judge_win_rate", mean, mean >= 0.5)
    record = judged.record()
    assert record.metrics["candidate.judge_win_rate"] == mean and record.tags["judge.model"] == "smollm2-judge:135m"
    assert (judged.judge.judgments_path, "eval") in record.files
    section = "\n".join(_judge_losses(judged))
    assert section.startswith(f"## Examples the judge says the candidate lost ({judged.judge.losses} of 2)")
    assert "smollm2-judge:135m" in section

    # A judge whose verdicts flip with the order more often than allowed measures nothing (from the cache: the
    # limit decides on the verdicts, it does not change them).
    strict = cfg.model_copy(update={"max_order_flips": 0.0})
    fake_ollama.requests.clear()
    if judged.judge.order_flips:
        with pytest.raises(
            JudgeError,
            match=rf"so gate.rules.judge_win_rate cannot be decided\): the judge's verdict "
            rf"changed with the order of the answers on {judged.judge.order_flips} of 2",
        ):
            judge_report(report, strict, examples, None, GATE, tmp_path / "strict", cache)
    else:
        assert judge_report(report, strict, examples, None, GATE, tmp_path / "strict", cache).judge.asked == 0
    assert "POST /api/chat" not in fake_ollama.calls

    # A re-run, with another gate and against a champion that answered as the base did: nothing is asked again.
    fake_ollama.requests.clear()
    again, _ = _evaluated(
        tmp_path / "eval2", {"candidate": [right[0], WRONG], "base": [WRONG, WRONG], "champion": [WRONG, right[1]]}
    )
    rejudged = judge_report(again, cfg, examples, None, GateConfig(), tmp_path / "judge2", cache)
    assert fake_ollama.calls == ["GET /api/tags"] and rejudged.judge.asked == 0
    assert rejudged.judge.opponent == "champion" and rejudged.champion.metrics["judge_win_rate"] == 1 - mean
    assert "judge_win_rate" not in rejudged.base.metrics and rejudged.candidate.metrics["judge_win_rate"] == mean


def test_identical_answers_tie_without_asking(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tunepipe.tasks.model.packaged import packaged_gguf

    same = _answers(1)
    report, examples = _evaluated(tmp_path / "eval", {"candidate": same, "base": same})
    cfg = JudgeConfig(model=str(packaged_gguf("smollm2-135m-instruct")))
    caplog.set_level(logging.INFO)
    judged = judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache")
    assert (judged.judge.identical, judged.judge.questions, judged.judge.asked) == (1, 0, 0)
    assert judged.candidate.metrics["judge_win_rate"] == judged.base.metrics["judge_win_rate"] == 0.5
    assert "started llama-cpp-python's server" not in caplog.text  # nothing to ask: no server


def _between(text: str) -> list[str]:
    """The two answers in a pairwise question, in the order shown."""
    return [text.split(f"[Assistant {x}'s answer]\n")[1].split("\n[End")[0] for x in "AB"]


def test_rubric_scores_each_answer_for_the_candidate_and_its_opponent(
    fake_ollama: FakeOllama, ollama_judge: str, tmp_path: Path
) -> None:
    report, examples = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    cfg = JudgeConfig(
        model=ollama_judge,
        base_url=fake_ollama.url,
        mode="rubric",
        structured=True,
        max_tokens=8,
        rubric="5: states the fact of the reference. 1: does not.",
    )
    judged = judge_report(report, cfg, examples, None, GateConfig(), tmp_path / "judge", tmp_path / "cache")
    asked = fake_ollama.bodies("/api/chat")
    assert len(asked) == 2 and all("[Rubric]\n5: states the fact" in a["messages"][-1]["content"] for a in asked)
    assert [a["format"]["properties"]["score"]["enum"] for a in asked] == [[1, 2, 3, 4, 5]] * 2
    row = json.loads(judged.judge.judgments_path.read_text())
    sample = json.loads(judged.samples_path.read_text())
    for who in ("candidate", "base"):
        rating = row["ratings"][who]
        assert rating in range(1, 6)
        assert sample[who]["scores"]["judge_score"] == getattr(judged, who).metrics["judge_score"] == (rating - 1) / 4


def test_an_unreadable_verdict_is_asked_again_once_with_the_format_restated(
    fake_ollama: FakeOllama, ollama_judge: str, tmp_path: Path
) -> None:
    report, examples = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    # Free text, and a single token to say it in: this judge's reply starts with no verdict.
    cfg = JudgeConfig(model=ollama_judge, base_url=fake_ollama.url, max_tokens=1, max_unparsed=1.0)
    judged = judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache")
    asked = fake_ollama.bodies("/api/chat")
    judgments = json.loads(judged.judge.judgments_path.read_text())["judgments"]
    assert len(asked) == sum(len(j["replies"]) for j in judgments) == 2 + judged.judge.restated
    assert judged.judge.restated >= 1, [j["replies"] for j in judgments]
    restated = next(body for body in asked if body["messages"][-1]["content"] == PAIRWISE_RESTATED)
    assert restated["messages"][-2]["role"] == "assistant" and "format" not in restated
    assert judged.judge.unparsed == sum(j["verdict"] is None for j in judgments)

    # One token is too few for a verdict after the restatement too ("[" from this judge), and such a judgment
    # counts as a tie.
    assert judged.judge.unparsed >= 1 and judged.candidate.metrics["judge_win_rate"] == 0.5

    # A judge that cannot keep to the format measures nothing: the rule it leaves undecided is named.
    strict = cfg.model_copy(update={"max_unparsed": 0.0})
    with pytest.raises(
        JudgeError,
        match=r"judge_win_rate could not be measured .*so gate.rules.judge_win_rate "
        r"cannot be decided.*could not be read in \d of 2 replies",
    ) as failed:
        judge_report(report, strict, examples, None, GATE, tmp_path / "strict", tmp_path / "cache")
    assert not is_transient(failed.value) and (tmp_path / "strict" / "judgments.jsonl").is_file()


def test_an_unreachable_judge_fails_naming_the_rule_and_is_retried_as_a_network_call(tmp_path: Path) -> None:
    report, examples = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    cfg = JudgeConfig(model="ollama:qwen2.5:7b", base_url=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(
        JudgeError,
        match=r"judge_win_rate could not be measured by the judge ollama:qwen2.5:7b "
        r"\(so gate.rules.judge_win_rate cannot be decided\)",
    ) as failed:
        judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache")
    assert is_transient(failed.value)


@pytest.mark.slow
def test_a_judge_restarting_mid_run_is_retried_by_the_task(
    prefect_server, fake_ollama: FakeOllama, ollama_judge: str, tmp_path: Path
) -> None:
    from prefect import flow

    from tunepipe.tasks.evaluate.judge import judge
    from tunepipe.tasks.runtime.config import RetryConfig
    from tunepipe.tasks.runtime.retries import network_retries

    report, examples = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    cfg = JudgeConfig(model=ollama_judge, base_url=fake_ollama.url, structured=True, max_tokens=12, max_order_flips=1)
    fake_ollama.fail("/api/chat", "restarting")  # the first question meets Ollama restarting (HTTP 503)

    @flow
    def judged():
        return judge.with_options(**network_retries(RetryConfig(attempts=2, backoff_s=0)))(
            report, cfg, examples, None, GATE, tmp_path / "runs"
        )

    result = judged()
    # The task's second try asks both questions.
    assert fake_ollama.calls.count("POST /api/chat") == 3 and result.judge.questions == result.judge.asked == 2
    assert result.candidate.metrics["judge_win_rate"] in (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_a_gguf_judge_is_served_by_llama_cpp_python_for_the_judging_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tunepipe.tasks.model.packaged import packaged_gguf

    right = _answers()
    report, examples = _evaluated(tmp_path / "eval", {"candidate": [right[0], WRONG], "base": [WRONG, right[1]]})
    key = "sk-judge-test-0123456789"
    monkeypatch.setenv("TUNEPIPE_TEST_JUDGE_KEY", key)
    cfg = JudgeConfig(
        model=str(packaged_gguf("smollm2-135m-instruct")),
        api_key_env="TUNEPIPE_TEST_JUDGE_KEY",
        structured=True,
        max_tokens=12,
        context_length=1024,
        max_order_flips=1,
    )
    caplog.set_level(logging.INFO)
    judged = judge_report(
        report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache", logging.getLogger("judge-test")
    )
    started = next(r.getMessage() for r in caplog.records if "started llama-cpp-python's server" in r.getMessage())
    port = int(started.split("127.0.0.1:")[1].split("/")[0])
    with socket.socket() as probe:  # stopped once the judging is done
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    rows = [json.loads(line) for line in judged.judge.judgments_path.read_text().splitlines()]
    assert judged.judge.asked == 4 and all(j["verdict"] in {"A", "B", "C"} for r in rows for j in r["judgments"])
    assert judged.judge.digest.startswith("sha256:") and judged.judge.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    server_log = (tmp_path / "judge" / "server.log").read_text()
    assert server_log.count('"POST /v1/chat/completions HTTP/1.1" 200') == 4  # the key was sent and accepted
    kept = [
        caplog.text,
        server_log,
        judged.judge.judgments_path.read_text(),
        judged.model_dump_json(),
        *(p.read_text() for p in (tmp_path / "cache").iterdir()),
    ]
    assert not [text for text in kept if key in text]

    # A cached re-run starts no server.
    caplog.clear()
    again = judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache")
    assert again.judge.asked == 0 and "started llama-cpp-python's server" not in caplog.text
    assert again.candidate.metrics == judged.candidate.metrics


def test_a_key_the_environment_lacks_is_named_not_guessed(tmp_path: Path) -> None:
    report, examples = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    cfg = JudgeConfig(model="openai:judge", base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key_env="NO_SUCH_KEY")
    with pytest.raises(JudgeError, match="eval.judge.api_key_env names NO_SUCH_KEY, which is not set") as failed:
        judge_report(report, cfg, examples, None, GATE, tmp_path / "judge", tmp_path / "cache")
    assert not is_transient(failed.value)


def test_gate_rule_on_the_judge_metric_fails_when_it_was_not_measured(tmp_path: Path) -> None:
    report, _ = _evaluated(tmp_path / "eval", {"candidate": _answers(1), "base": [WRONG]})
    check = decide(report, GateConfig(rules={"judge_win_rate": MetricRule(min=0.5)})).checks[0]
    assert not check.passed and "judge_win_rate was not measured" in check.reason


@pytest.mark.slow
def test_the_finetune_flow_gates_on_the_judge_and_keeps_its_verdicts(
    prefect_server, fast_config, fake_ollama: FakeOllama, ollama_judge: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from tunepipe.flows.finetune import GateFailed, finetune
    from tunepipe.tasks.runtime.config import PipelineConfig

    raw = fast_config(tmp_path)
    raw["eval"]["judge"] = {
        "model": ollama_judge,
        "base_url": fake_ollama.url,
        "structured": True,
        "max_tokens": 12,
        "max_order_flips": 1.0,
    }
    raw["gate"] = {"rules": {"judge_win_rate": {"min": 1.01}}}  # out of reach: the run stops at the gate
    state = finetune(PipelineConfig.model_validate(raw), return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GateFailed), state.message
    judged = error.eval
    # eval.max_samples, each in both orders unless both models answered alike (as the tiny model's few steps may)
    assert judged.judge.n == 2 and judged.judge.questions == 2 * (2 - judged.judge.identical)
    assert len(fake_ollama.bodies("/api/chat")) == judged.judge.questions
    assert f"judge_win_rate is {judged.candidate.metrics['judge_win_rate']:.4g}, below the minimum 1.01" in str(error)
    client = MlflowClient(tracking_uri=raw["tracking"]["uri"])
    run = client.get_run(error.mlflow_run_id)
    assert run.data.tags["judge.model"] == "smollm2-judge:135m" and run.data.tags["judge.digest"].startswith("sha256:")
    assert run.data.metrics["candidate.judge_win_rate"] == judged.candidate.metrics["judge_win_rate"]
    assert "judgments.jsonl" in {Path(f.path).name for f in client.list_artifacts(error.mlflow_run_id, "eval")}
    report = error.report.path.read_text()
    assert "## Examples the judge says the candidate lost" in report and "smollm2-judge:135m" in report


def test_the_prose_config_is_judged_by_a_packaged_gguf() -> None:
    cfg = load_config("configs/rag-prose.yaml")
    assert (cfg.eval.judge.kind, cfg.data.output_format) == ("gguf", "text")
    assert Path(cfg.eval.judge.model).expanduser().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "judge_win_rate" in cfg.gate.rules
