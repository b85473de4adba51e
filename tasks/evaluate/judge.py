"""Judge the test answers with a second model, pairwise against the champion or on a rubric; its verdicts become
per-example metrics that the gate reads like any other.

Who judges (`eval.judge.model`): a model on an Ollama server (/api/chat), any OpenAI-compatible chat endpoint
(/v1/chat/completions; the key from an environment variable, never written anywhere), or a local GGUF file,
which tunepipe serves for the judging with llama-cpp-python's own OpenAI-compatible server
(`tasks/evaluate/judge_server.py`) and stops after.

Pairwise (MT-Bench's protocol): for each test example the judge sees the question as the models saw it (system
prompt and retrieved context included), the reference answer and two answers, the candidate's and its opponent's
(the champion's; the base's for a first model), and is asked twice, with the answers in both orders. A verdict that
holds in both orders counts (win 1, tie 0.5, loss 0); one that changes with the order (the judge preferred a
position, not an answer) counts as a tie, and the share of such order flips is reported; more than `max_order_flips`
of them, and the judge's metric counts as not measured. Two identical answers tie without asking. The candidate's
per-example `judge_win_rate` is that value and its opponent's is 1 minus it, so the gate's paired comparison reads
them as any per-example metric. Rubric (G-Eval style): each of the two answers is scored 1-5 against the reference
under `eval.judge.rubric`; `judge_score` is (score - 1) / 4. The prompts, and how a verdict is read from a reply,
are in `tasks/evaluate/judge_protocol.py`.

A reply whose verdict cannot be read is asked again once with the format restated; one still unreadable counts
as neutral (a tie; the rubric's middle) and is counted; more than `max_unparsed` of them, and the judge's
metrics count as not measured. A judge that does not answer fails the stage (a transient failure first goes
through the task's network retries) with a message naming the gate rules that could not be measured: never a
silent pass.

Every judgment (the messages sent, each raw reply, the verdict read) is kept per example in the stage's
`judgments.jsonl`, and cached under `<workdir>/judge/cache` by the judge's model and digest, the mode, the
messages (question, reference, answers, instructions) and the reply settings: a re-run asks only what it has
not asked before, and starts no server when it has asked everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prefect import get_run_logger, task

from tunepipe.tasks.chat.examples import read_examples
from tunepipe.tasks.evaluate.judge_protocol import (
    OUTCOME,
    Ask,
    Judgment,
    ask_judge,
    pairwise_messages,
    pairwise_result,
    question_text,
    rubric_messages,
)
from tunepipe.tasks.evaluate.results import EvalReport, JudgeSummary, ModelScores
from tunepipe.tasks.runtime.caching import file_digest, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import GateConfig, JudgeConfig
from tunepipe.tasks.runtime.redact import redact

SERVER_START_S = 300  # a .gguf judge's server: loading the model, on a busy CPU


class JudgeError(RuntimeError):
    """The judge could not measure: unreachable, refusing, or not keeping to the verdict format."""


# --- who judges --------------------------------------------------------------------------------------------


def judge_identity(cfg: JudgeConfig, ollama_host: str | None) -> tuple[str, str | None, str]:
    """(model, digest, where) of the judge: what its cached verdicts are keyed by, and where it answers."""
    if cfg.kind == "gguf":
        path = Path(cfg.model).expanduser()
        if not path.is_file():
            raise JudgeError(f"eval.judge.model: no GGUF file at {path}")
        return path.name, file_digest(path), "llama-cpp-python's server, started for the judging"
    if cfg.kind == "openai":
        # An OpenAI-compatible API names no weights digest: verdicts are keyed by model name and endpoint.
        return cfg.model.removeprefix("openai:"), None, redact(cfg.base_url or "")
    from tunepipe.tasks.integrations.ollama.client import OllamaClient, OllamaError
    from tunepipe.tasks.integrations.ollama.host import ollama_host as resolve_host

    host, name = resolve_host(cfg.base_url or ollama_host), cfg.model.removeprefix("ollama:")
    try:
        digest = OllamaClient(host, cfg.timeout_s).digest(name)
    except OllamaError as exc:
        raise JudgeError(f"the judge's Ollama at {redact(host)} did not list its models: {exc}") from exc
    if digest is None:
        raise JudgeError(f"the judge model {name!r} is not on the Ollama at {redact(host)}: `ollama pull {name}` there")
    return name, digest, redact(host)


@contextlib.contextmanager
def judge_endpoint(
    cfg: JudgeConfig, ollama_host: str | None, server_log: Path, log: logging.Logger | logging.LoggerAdapter
) -> Iterator[Ask]:
    """A function that asks the judge one conversation (with a JSON schema its reply must follow, or None) and
    returns its reply; a .gguf judge's server runs while the context is open."""
    key = _api_key(cfg)
    if cfg.kind == "ollama":
        from tunepipe.tasks.integrations.ollama.client import OllamaClient
        from tunepipe.tasks.integrations.ollama.host import ollama_host as resolve_host

        client = OllamaClient(resolve_host(cfg.base_url or ollama_host), cfg.timeout_s)
        name = cfg.model.removeprefix("ollama:")

        def ask(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> str:
            reply = client.chat(name, messages, {"temperature": 0, "num_predict": cfg.max_tokens}, format=schema)
            return reply.message.content or ""

        yield ask
    elif cfg.kind == "openai":
        with _openai_chat(cfg.base_url or "", cfg.model.removeprefix("openai:"), key, cfg, "json_schema") as ask:
            yield ask
    else:
        with (
            local_judge_server(Path(cfg.model).expanduser(), cfg.context_length, key, server_log, log) as url,
            _openai_chat(url, "judge", key, cfg, "llama-cpp-python") as ask,
        ):
            yield ask


def _api_key(cfg: JudgeConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise JudgeError(f"eval.judge.api_key_env names {cfg.api_key_env}, which is not set in this environment")
    return key


@contextlib.contextmanager
def _openai_chat(base_url: str, model: str, key: str | None, cfg: JudgeConfig, dialect: str) -> Iterator[Ask]:
    """/chat/completions of an OpenAI-compatible API. JSON schemas go as OpenAI's `json_schema` response format;
    llama-cpp-python's server takes them as a `json_object` with a `schema`."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=cfg.timeout_s, headers=headers, trust_env=False) as http:

        def ask(messages: list[dict[str, str]], schema: dict[str, Any] | None) -> str:
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": cfg.max_tokens,
            }
            if schema is not None:
                body["response_format"] = (
                    {"type": "json_object", "schema": schema}
                    if dialect == "llama-cpp-python"
                    else {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
                )
            response = http.post("/chat/completions", json=body)
            if response.is_error:
                raise httpx.HTTPStatusError(
                    f"HTTP {response.status_code} from {redact(str(response.url))}: {response.text[:500]}",
                    request=response.request,
                    response=response,
                )
            return response.json()["choices"][0]["message"].get("content") or ""

        yield ask


@contextlib.contextmanager
def local_judge_server(
    gguf: Path, context_length: int, key: str | None, server_log: Path, log: logging.Logger | logging.LoggerAdapter
) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server for `gguf` on a free local port, for the duration; yields its
    base URL (…/v1). Its output goes to `server_log`; the key, when one is set, is passed in its environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Half the cores, as for parity: llama.cpp's threads spin while they wait, so more than the free cores is ruinous.
    threads = str(max((os.cpu_count() or 2) // 2, 1))
    command = [
        sys.executable,
        "-m",
        "tunepipe.tasks.evaluate.judge_server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(context_length),
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
    ]
    env = {**os.environ, "API_KEY": key} if key else {k: v for k, v in os.environ.items() if k != "API_KEY"}
    server_log.parent.mkdir(parents=True, exist_ok=True)
    with server_log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    log.info("judge: started llama-cpp-python's server for %s at %s (pid %d)", gguf.name, url, process.pid)
    try:
        _wait_until_serving(url, process, server_log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("judge: stopped the server at %s", url)


def _wait_until_serving(url: str, process: subprocess.Popen, server_log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server_log.read_text(errors="replace")[-3000:]
            raise JudgeError(f"the judge's server exited with status {process.returncode} before serving:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            # Any HTTP answer means it serves (401 when a key is required).
            httpx.get(f"{url}/models", timeout=2, trust_env=False)
            return
        time.sleep(0.25)
    raise JudgeError(f"the judge's server did not answer at {url} within {SERVER_START_S} s (log: {server_log})")


# --- judging a report --------------------------------------------------------------------------------------


def judge_report(
    report: EvalReport,
    cfg: JudgeConfig,
    eval_examples: Path,
    ollama_host: str | None,
    gate_cfg: GateConfig,
    out_dir: Path,
    cache_dir: Path,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> EvalReport:
    """`report` with the judge's metric added for the candidate and its opponent (mean in their ModelScores,
    per example in a copy of the samples), and the judge's summary and judgments."""
    log = log or logging.getLogger(__name__)
    rows = [json.loads(line) for line in report.samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = {example.id: example.prompt for example in read_examples(eval_examples)}
    opponent = "champion" if report.champion is not None else "base"
    try:
        model, digest, where = judge_identity(cfg, ollama_host)
        questions = []  # per example: what is asked, as (label, messages)
        for row in rows:
            if row["id"] not in prompts:
                raise JudgeError(f"example {row['id']} of {report.samples_path} is not in {eval_examples}")
            question = question_text(prompts[row["id"]])
            mine, theirs = row["candidate"]["answer"], row[opponent]["answer"]
            if cfg.mode == "pairwise" and mine.strip() == theirs.strip():
                questions.append([])  # the same answer cannot beat itself: a tie, nothing to ask
            elif cfg.mode == "pairwise":
                questions.append(
                    [
                        ("candidate as A", pairwise_messages(question, row["expected"], mine, theirs, cfg.structured)),
                        ("candidate as B", pairwise_messages(question, row["expected"], theirs, mine, cfg.structured)),
                    ]
                )
            else:
                questions.append(
                    [
                        (
                            who,
                            rubric_messages(question, row["expected"], row[who]["answer"], cfg.rubric, cfg.structured),
                        )
                        for who in ("candidate", opponent)
                    ]
                )
        # Keyed by the weights where the judge names them; else by the name and where it answers.
        identity = (model, digest or where)
        judgments, asked, seconds = _judgments(questions, cfg, identity, ollama_host, out_dir, cache_dir, log)
    except Exception as exc:
        raise JudgeError(f"{_unmeasured(cfg, gate_cfg)}: {exc}") from exc

    n, calls = len(rows), sum(map(len, judgments))
    unread = sum(j.verdict is None for per_example in judgments for j, _ in per_example)
    restated = sum(len(j.replies) > 1 for per_example in judgments for j, _ in per_example)
    records, values = [], []
    for row, per_example in zip(rows, judgments):
        verdicts = [j.verdict for j, _ in per_example]
        if cfg.mode == "pairwise":
            result, value = pairwise_result(*verdicts) if verdicts else ("identical", OUTCOME["tie"])
            values.append({"candidate": value, opponent: 1 - value})
            summary = {"result": result, "candidate_value": value}
        else:
            ratings = [int(v) if v is not None else None for v in verdicts]
            values.append(
                {who: ((r if r is not None else 3) - 1) / 4 for who, r in zip(("candidate", opponent), ratings)}
            )
            summary = {"ratings": dict(zip(("candidate", opponent), ratings))}
        records.append(
            {
                "id": row["id"],
                "source": row["source"],
                "prompt": row["prompt"],
                "expected": row["expected"],
                "candidate": row["candidate"]["answer"],
                opponent: row[opponent]["answer"],
                **summary,
                "judgments": [
                    {"asked": label, "cached": cached, **j.model_dump()}
                    for (label, _), (j, cached) in zip(questions[len(records)], per_example)
                ],
            }
        )
    results = [r.get("result") for r in records]
    summary = JudgeSummary(
        model=model,
        digest=digest,
        endpoint=where,
        mode=cfg.mode,
        metric=cfg.metric,
        opponent=opponent,
        n=n,
        questions=calls,
        asked=asked,
        restated=restated,
        unparsed=unread,
        seconds=seconds,
        wins=results.count("win"),
        ties=results.count("tie"),
        losses=results.count("loss"),
        order_flips=results.count("flip"),
        identical=results.count("identical"),
        judgments_path=out_dir / "judgments.jsonl",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with summary.judgments_path.open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if calls and unread / calls > cfg.max_unparsed + 1e-9:
        raise JudgeError(
            f"{_unmeasured(cfg, gate_cfg)}: the judge's verdict could not be read in {unread} of "
            f"{calls} replies, even with the format restated "
            f"(eval.judge.max_unparsed {cfg.max_unparsed:g}); its replies are in {summary.judgments_path}"
        )
    if (flips := summary.order_flip_rate) is not None and flips > cfg.max_order_flips + 1e-9:
        raise JudgeError(
            f"{_unmeasured(cfg, gate_cfg)}: the judge's verdict changed with the order of the answers on "
            f"{summary.order_flips} of "
            f"{summary.order_flips + summary.wins + summary.ties + summary.losses} "
            f"examples (eval.judge.max_order_flips {cfg.max_order_flips:g}): it judged positions, not "
            f"answers; its replies are in {summary.judgments_path}"
        )
    samples_path = out_dir / "samples.jsonl"
    with samples_path.open("w", encoding="utf-8") as out:
        for row, value in zip(rows, values):
            for who, v in value.items():
                row[who]["scores"][cfg.metric] = v
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info("judge: %s", summary.line())
    scored = {who: getattr(report, who) for who in ("candidate", opponent)}
    means = {who: sum(v[who] for v in values) / n for who in scored} if n else {}
    return report.model_copy(
        update={
            "samples_path": samples_path,
            "judge": summary,
            **{
                who: ModelScores(name=s.name, version=s.version, metrics={**s.metrics, cfg.metric: means[who]})
                for who, s in scored.items()
                if who in means
            },
        }
    )


def _judgments(
    questions: list[list[tuple[str, list[dict[str, str]]]]],
    cfg: JudgeConfig,
    identity: tuple[str, str],
    ollama_host: str | None,
    out_dir: Path,
    cache_dir: Path,
    log: logging.Logger | logging.LoggerAdapter,
) -> tuple[list[list[tuple[Judgment, bool]]], int, float]:
    """Per example, (judgment, from the cache) per question; how many were asked now, and the seconds that took."""
    keys = [
        [stable_hash(*identity, cfg.mode, cfg.structured, cfg.max_tokens, messages) for _, messages in asked]
        for asked in questions
    ]
    cached = {
        key: Judgment.model_validate_json(path.read_text())
        for per_example in keys
        for key in per_example
        if (path := cache_dir / f"{key}.json").is_file()
    }
    # Each distinct question once (two models may have given the same answer).
    todo = list(
        {
            key: (i, j) for i, per_example in enumerate(keys) for j, key in enumerate(per_example) if key not in cached
        }.values()
    )
    seconds = 0.0
    if todo:
        log.info(
            "judge: asking %s %d of %d questions (%d cached)",
            identity[0],
            len(todo),
            sum(map(len, keys)),
            sum(map(len, keys)) - len(todo),
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        with judge_endpoint(cfg, ollama_host, out_dir / "server.log", log) as ask:
            for i, j in todo:
                judgment = ask_judge(ask, questions[i][j][1], cfg.mode, cfg.structured)
                seconds += judgment.seconds
                partial = cache_dir / f"{keys[i][j]}.partial"
                partial.write_text(judgment.model_dump_json())
                partial.replace(partial.with_suffix(".json"))  # whole or absent, even when the run is killed
                cached[keys[i][j]] = judgment
    fresh = {keys[i][j] for i, j in todo}
    return ([[(cached[key], key not in fresh) for key in per_example] for per_example in keys], len(todo), seconds)


def _unmeasured(cfg: JudgeConfig, gate_cfg: GateConfig) -> str:
    """What the judge's failure leaves unmeasured, in words: the gate rules on its metric."""
    rules = [
        f"gate.{section}.{cfg.metric}"
        for section, named in (("rules", gate_cfg.rules), ("must_beat_champion_by", gate_cfg.must_beat_champion_by))
        if cfg.metric in named
    ]
    decided = f"so {' and '.join(rules)} cannot be decided" if rules else "no gate rule names it"
    return f"{cfg.metric} could not be measured by the judge {cfg.model} ({decided})"


@task(name="judge")
def judge(
    report: EvalReport,
    cfg: JudgeConfig,
    eval_examples: Path,
    ollama_host: str | None,
    gate_cfg: GateConfig,
    workdir: Path,
) -> EvalReport:
    """Not cached as a stage: each judgment is (by the judge's digest), so a changed gate never re-judges."""
    out_dir = stage_dir(workdir, "judge", report, cfg)
    return judge_report(
        report, cfg, eval_examples, ollama_host, gate_cfg, out_dir, Path(workdir) / "judge" / "cache", get_run_logger()
    )
