"""Retention: general prompts read with file:line errors, the base's answers scored by base and candidate in a
worker of their own (kept for the next candidate), the gate rule that says the candidate forgot how to chat, and
the report's side-by-side section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_results import trained

from tunepipe.tasks.chat.general_prompts import GeneralPromptsError, read_file, read_prompts
from tunepipe.tasks.evaluate.gate import decide
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores, RetentionScores
from tunepipe.tasks.runtime.config import ConfigError, GateConfig, RetentionConfig, load_config


def test_builtin_prompts_change_language_from_one_to_the_next():
    prompts = read_prompts(RetentionConfig())
    assert len(prompts) == 16 and len({p.id for p in prompts}) == 16
    languages = [p.language for p in prompts]
    assert all(a != b for a, b in zip(languages, languages[1:]))
    assert {"en", "fr", "de", "es", "zh"} <= set(languages[:5])
    assert all(p.messages[-1].role == "user" and p.prompt for p in prompts)
    assert read_prompts(RetentionConfig(builtin=3)) == prompts[:3]


def test_users_prompts_follow_the_builtin_ones(tmp_path: Path):
    own = tmp_path / "general.jsonl"
    own.write_text(
        '{"prompt": "Tell me a joke."}\n\n'
        '{"id": "polite", "messages": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Thanks!"}]}\n'
    )
    prompts = read_prompts(RetentionConfig(builtin=2, prompts=own))
    assert [p.id for p in prompts[2:]] == ["general.jsonl:1", "polite"]
    assert prompts[2].source == f"{own}:1" and prompts[3].source == f"{own}:3"
    assert [m.role for m in prompts[3].messages] == ["system", "user"]


def test_bad_lines_are_named_by_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "fine"}\n'
        "not json\n"
        '{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"prompt": "x", "lang": "en"}\n'
        '{"prompt": "   "}\n'
    )
    with pytest.raises(GeneralPromptsError) as error:
        read_file(bad)
    message = str(error.value)
    assert f"{bad}:1" not in message
    for line, what in (
        (2, "not a JSON object"),
        (3, "not both"),
        (4, "end with a user turn"),
        (5, "lang: Extra inputs are not permitted"),
        (6, "`prompt` is empty"),
    ):
        assert f"{bad}:{line}: " in message and what in message, (line, message)
    # A config naming such a file fails when it loads, before anything trains.
    config = tmp_path / "config.yaml"
    config.write_text(Path("configs/demo.yaml").read_text())
    with pytest.raises(ConfigError, match=f"{bad}:2: not a JSON object"):
        load_config(config, [f"eval.retention.prompts={bad}"])
    with pytest.raises(ConfigError, match="no such file|No such file"):
        load_config(config, [f"eval.retention.prompts={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="there are 16 built-in prompts"):
        load_config(config, ["eval.retention.builtin=17"])


def test_the_rule_needs_prompts_to_decide_on(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(Path("configs/demo.yaml").read_text())
    with pytest.raises(ConfigError, match="gate.retention needs general prompts"):
        load_config(config, ["eval.retention.builtin=0"])
    assert load_config(config, ["eval.retention.builtin=0", "gate.retention=null"]).gate.retention is None


# --- the gate rule --------------------------------------------------------------------------------------------


def _report(tmp_path: Path, retention: RetentionScores | None) -> EvalReport:
    scores = ModelScores(name="candidate", metrics={"eval_loss": 0.5})
    return EvalReport(
        n_samples=4,
        candidate=scores,
        base=scores.model_copy(update={"name": "base"}),
        champion=None,
        samples_path=tmp_path / "samples.jsonl",
        probes_path=tmp_path / "probes.jsonl",
        retention=retention,
    )


def _scores(tmp_path: Path, base: float, candidate: float) -> RetentionScores:
    """16 prompts of 10 answer tokens: the base's loss `base` on each, the candidate's `candidate` ± 0.2."""
    path = tmp_path / "retention.jsonl"
    rows = [
        {"tokens": 10, "base": {"loss": base}, "candidate": {"loss": candidate + (0.2 if i % 2 else -0.2)}}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return RetentionScores(n_prompts=16, base_loss=base, candidate_loss=candidate, path=path)


def test_a_candidate_that_forgot_how_to_chat_fails_the_gate_saying_so(tmp_path: Path):
    cfg = GateConfig.model_validate({"retention": {"max_loss_increase": 0.5}})
    kept = decide(_report(tmp_path, _scores(tmp_path, 1.1, 1.6)), cfg)  # exactly at the limit
    assert kept.passed and kept.checks[0].metric == "retention.loss_increase"
    reason = kept.checks[0].reason
    assert reason.startswith(
        "retention within its limit: the candidate's loss on the base's answers to 16 "
        "general prompts went from 1.100 to 1.600 nats per token (+0.500 ["
    )
    assert reason.endswith("] at 95% confidence; at most +0.5 allowed)")
    # The mean decides; the paired interval of the rise over the 16 prompts is reported with it.
    interval = kept.checks[0].interval
    assert kept.checks[0].n == interval.n == 16 and interval.metric == "retention_loss"
    assert -interval.high < 0.5 < -interval.low and interval.difference == pytest.approx(-0.5)

    forgot = decide(_report(tmp_path, _scores(tmp_path, 1.1, 2.9)), cfg)
    assert not forgot.passed
    (reason,) = forgot.reasons
    assert reason.startswith(
        "the candidate forgot how to chat: its loss on the base's answers to 16 general "
        "prompts rose from 1.100 to 2.900 nats per token (+1.800 ["
    )
    assert "6.0 times less likely per token" in reason
    assert forgot.checks[0].value == pytest.approx(1.8) and forgot.checks[0].limit == 0.5


def test_a_report_without_retention_or_a_config_without_the_rule_has_no_retention_check(tmp_path: Path):
    assert decide(_report(tmp_path, None), GateConfig()).checks == []
    assert decide(_report(tmp_path, _scores(tmp_path, 1.1, 2.9)), GateConfig(retention=None)).checks == []


# --- the stage, on the tiny model -----------------------------------------------------------------------------


def _noisy(source: Path, out: Path, scale: float, seed: int, replace: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                noise = torch.randn_like(weight) * scale
                weight.copy_(noise) if replace else weight.add_(noise)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chatty_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with random dense weights: its greedy answers are words that vary from prompt to prompt (the
    tiny model's own are a token that decodes to nothing)."""
    return _noisy(tiny_model, tmp_path_factory.mktemp("chatty"), 0.3, 0, replace=True)


@pytest.fixture(scope="module")
def forgetful_model(chatty_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chatty model with more noise on its dense weights: what it would say differs from the chatty one's."""
    return _noisy(chatty_model, tmp_path_factory.mktemp("forgetful"), 0.3, 1, replace=False)


def _request(out_dir: Path) -> dict:
    return json.loads((out_dir / "worker" / "worker-request.json").read_text())


@pytest.mark.slow  # trains and scores in workers
def test_the_candidates_loss_on_the_bases_answers_measures_what_it_forgot(
    chatty_model: Path, forgetful_model: Path, tmp_path: Path
):
    from tunepipe.tasks.chat.template import ChatContext
    from tunepipe.tasks.evaluate.report import retention_section
    from tunepipe.tasks.evaluate.retention import measure_retention
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import ModelConfig

    base = resolve_base_model(ModelConfig(base=str(chatty_model)))
    cfg = RetentionConfig(builtin=4, max_new_tokens=6)
    prompts = read_prompts(cfg)

    def measure(candidate: Path, out: str) -> RetentionScores:
        return measure_retention(
            trained(candidate), base, ChatContext(), prompts, cfg, 4, tmp_path / out, tmp_path / "reference"
        )

    same = measure(chatty_model, "same")
    assert _request(tmp_path / "same")["base_outputs"] is None  # the base answered first
    assert same.n_prompts == 4 and same.base_loss > 0
    assert same.candidate_loss == pytest.approx(same.base_loss, abs=1e-4)  # the same weights: nothing forgotten

    forgot = measure(forgetful_model, "forgot")
    assert _request(tmp_path / "forgot")["base_outputs"] is not None  # the base's outputs were kept
    assert forgot.base_loss == pytest.approx(same.base_loss, abs=1e-6)
    assert forgot.loss_increase > 1.0
    rows = [json.loads(line) for line in forgot.path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [p.id for p in prompts]
    assert [row["base"]["answer"] for row in rows] == [
        json.loads(line)["base"]["answer"] for line in same.path.read_text().splitlines()
    ]
    assert all(row["tokens"] > 0 and row["candidate"]["loss"] > row["base"]["loss"] for row in rows)
    assert any(row["base"]["answer"] != row["candidate"]["answer"] for row in rows)
    assert sum(r["candidate"]["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows) == (
        pytest.approx(forgot.candidate_loss)
    )

    assert not decide(_report(tmp_path, forgot), GateConfig()).passed
    section = "\n".join(retention_section(forgot))
    assert "## Retention" in section and rows[0]["prompt"][:20] in section


def test_an_answer_cut_at_the_limit_is_scored_without_the_end_of_turn(tiny_model: Path):
    from transformers import AutoTokenizer

    from tunepipe.tasks.chat.examples import Message
    from tunepipe.tasks.chat.template import ChatContext
    from tunepipe.tasks.data.format import IGNORE
    from tunepipe.tasks.evaluate.retention import answer_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    conversation = [Message(role="user", content="Say something.")]
    stopped, cut = answer_rows(
        tokenizer, [conversation, conversation], ["Hello there", "Hello there"], [True, False], ChatContext()
    )
    said = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    scored = [token for token, label in zip(cut["input_ids"], cut["labels"]) if label != IGNORE]
    assert scored == said
    ended = [token for token, label in zip(stopped["input_ids"], stopped["labels"]) if label != IGNORE]
    assert ended[: len(said)] == said and tokenizer.convert_tokens_to_ids("<|im_end|>") in ended[len(said) :]


@pytest.mark.slow  # answers in a worker
def test_empty_answers_cut_at_the_limit_leave_nothing_to_measure(tiny_model: Path, tmp_path: Path):
    """The tiny model's greedy token decodes to nothing: no word of the base's to score, so no retention."""
    from tunepipe.tasks.chat.template import ChatContext
    from tunepipe.tasks.evaluate.retention import measure_retention
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import ModelConfig

    base = resolve_base_model(ModelConfig(base=str(tiny_model)))
    cfg = RetentionConfig(builtin=2, max_new_tokens=4)
    assert (
        measure_retention(
            trained(tiny_model),
            base,
            ChatContext(),
            read_prompts(cfg),
            cfg,
            2,
            tmp_path / "out",
            tmp_path / "reference",
        )
        is None
    )
