"""The data check: the real Great Expectations suite on the broken-file corpus, with the tiny model's tokenizer."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tunepipe.tasks.chat.examples import read_examples
from tunepipe.tasks.data.check import DataCheckError, check_dataset
from tunepipe.tasks.data.files import Rejection
from tunepipe.tasks.data.load import load_dataset
from tunepipe.tasks.data.results import CheckedData
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.config import DataConfig, ModelConfig

CORPUS = Path(__file__).parent / "corpus"
ROWS = CORPUS / "rows"
ROLES_EXPECTED = "expected an optional system message, then user/assistant turns alternating, ending with the assistant"


def _check(tmp_path: Path, tiny_model: Path, max_seq_length: int = 128, **data: object) -> CheckedData:
    """The check of `data`; with a test split (data.eval) given, the validation split is given too, so that the
    few rows of a corpus file all train."""
    given = {"validation": CORPUS / "leak_validation.jsonl"} if "eval" in data else {}
    cfg = DataConfig(**{"min_rows": 1, "max_invalid_fraction": 1.0, **given, **data})
    model = ModelConfig(base=str(tiny_model), max_seq_length=max_seq_length)
    loaded = load_dataset(cfg, tmp_path / "load")
    return check_dataset(loaded, cfg, resolve_base_model(model), model, tmp_path / "check")


def _quarantine(checked: CheckedData) -> list[Rejection]:
    return [Rejection.model_validate_json(line) for line in checked.quarantine_path.read_text().splitlines()]


def test_broken_corpus_every_row_named_and_accounted_for(tmp_path: Path, tiny_model: Path) -> None:
    checked = _check(tmp_path, tiny_model, train=ROWS, eval=CORPUS / "leak_eval.jsonl")

    unknown = (
        "unknown shape: keys \"question\", \"answer\"; expected 'messages' (openai), 'conversations' "
        "(sharegpt), 'instruction' + 'output' (alpaca), 'input' + 'output' (pairs) or 'prompt' + "
        "'completion' / 'chosen' + 'rejected' (trl)"
    )
    assert [(r.stage, r.message) for r in _quarantine(checked)] == [
        ("load", f'{ROWS}/alpaca.json row 2: missing field "output"'),
        ("load", f"{ROWS}/bad_byte.jsonl:2: not valid UTF-8: byte 0xe9 at byte 18 of the line"),
        ("load", f"{ROWS}/mixed_shapes.jsonl:5: {unknown}"),
        ("load", f'{ROWS}/nulls_and_types.jsonl:2: field "input" is null'),
        ("load", f'{ROWS}/nulls_and_types.jsonl:3: field "output" is null'),
        ("load", f'{ROWS}/nulls_and_types.jsonl:4: field "input" must be a string, got number'),
        ("load", f'{ROWS}/nulls_and_types.jsonl:5: field "output" must be a string or a JSON object, got boolean'),
        ("load", f'{ROWS}/nulls_and_types.jsonl:6: field "messages" must be a list of turns, got string'),
        ("load", f"{ROWS}/pairs.csv row 2: 3 cells, the header has 2"),
        (
            "load",
            f'{ROWS}/roles.jsonl:1: field "messages[1].role" must be one of "system", "user", "assistant"; got "bot"',
        ),
        ("load", f"{ROWS}/truncated.jsonl:3: invalid JSON: Expecting ',' delimiter (column 62)"),
        ("load", f"{ROWS}/truncated.jsonl:5: invalid JSON: Unterminated string starting at (column 42)"),
        ("check", f"{ROWS}/chat.parquet row 2: no assistant turn; roles user: {ROLES_EXPECTED}"),
        ("check", f"{ROWS}/duplicates.jsonl:3: exact duplicate of {ROWS}/duplicates.jsonl:1"),
        ("check", f"{ROWS}/duplicates.jsonl:4: duplicate up to case and whitespace of {ROWS}/duplicates.jsonl:2"),
        ("check", f"{ROWS}/json_targets.jsonl:2: answer is not valid JSON: 'Product 61 costs $61'"),
        ("check", f"{ROWS}/json_targets.jsonl:3: answer is not a JSON object: '[\"Product 62\"]'"),
        ("check", f"{ROWS}/overlong.jsonl:2: 386 tokens > max_seq_length 128"),
        ("check", f"{ROWS}/roles.jsonl:2: no assistant turn; roles system,user: {ROLES_EXPECTED}"),
        ("check", f"{ROWS}/roles.jsonl:3: roles user,user,assistant: {ROLES_EXPECTED}"),
        ("check", f"{ROWS}/roles.jsonl:4: empty turn: messages[1] (assistant) has no text"),
    ]
    # The invariant, per file: every row read is kept (train, validation or test) or quarantined, never both,
    # never lost.
    by_file = {
        Path(f.source).name: (f.rows_read, f.kept_train + f.kept_validation + f.kept_eval, f.quarantined)
        for f in checked.files
    }
    assert by_file == {
        "alpaca.json": (3, 2, 1),
        "bad_byte.jsonl": (3, 2, 1),
        "chat.parquet": (3, 2, 1),
        "duplicates.jsonl": (4, 2, 2),
        "json_targets.jsonl": (4, 2, 2),
        "mixed_shapes.jsonl": (5, 4, 1),
        "nulls_and_types.jsonl": (7, 2, 5),
        "overlong.jsonl": (3, 2, 1),
        "pairs.csv": (3, 2, 1),
        "roles.jsonl": (5, 1, 4),
        "truncated.jsonl": (5, 3, 2),
        "leak_validation.jsonl": (2, 2, 0),
        "leak_eval.jsonl": (2, 2, 0),
    }
    assert {
        Path(f.source).name: (f.kept_validation, f.kept_eval) for f in checked.files if f.kept_validation or f.kept_eval
    } == {"leak_validation.jsonl": (2, 0), "leak_eval.jsonl": (0, 2)}
    kept = [
        *read_examples(checked.train.clean_path),
        *read_examples(checked.validation.clean_path),
        *read_examples(checked.eval.clean_path),
    ]
    assert len(kept) + len(_quarantine(checked)) == checked.rows_read == 49
    assert {e.where for e in kept}.isdisjoint(r.message.rsplit(": ", 1)[0] for r in _quarantine(checked))


def test_leakage_sets_the_train_copy_aside(tmp_path: Path, tiny_model: Path) -> None:
    checked = _check(tmp_path, tiny_model, train=CORPUS / "leak_train.jsonl", eval=CORPUS / "leak_eval.jsonl")
    assert [r.message for r in _quarantine(checked)] == [
        f"{CORPUS}/leak_train.jsonl:7: leakage: the same prompt is in a held-out split (test: "
        f"{CORPUS}/leak_eval.jsonl:1); kept there, set aside here"
    ]
    assert (checked.train.n_passed, checked.validation.n_passed, checked.eval.n_passed) == (6, 2, 2)


def test_leakage_into_validation_sets_the_train_copy_aside_and_test_wins_over_validation(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A validation question in train would make the choices on validation optimistic; a test question in
    validation would let them see the test split. The earlier split's copy is set aside."""
    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        "".join(
            json.dumps({"input": f"<p>Product {i}</p>", "output": {"name": f"Product {i}", "price": i}}) + "\n"
            for i in (200, 300, 400)
        )
    )
    checked = _check(
        tmp_path, tiny_model, train=CORPUS / "leak_train.jsonl", eval=CORPUS / "leak_eval.jsonl", validation=validation
    )
    assert {r.message for r in _quarantine(checked)} == {
        f"{CORPUS}/leak_train.jsonl:1: leakage: the same prompt is in a held-out split (validation: {validation}:1); "
        "kept there, set aside here",
        f"{CORPUS}/leak_train.jsonl:7: leakage: the same prompt is in a held-out split (test: "
        f"{CORPUS}/leak_eval.jsonl:1); kept there, set aside here",
        f"{validation}:2: leakage: the same prompt is in a held-out split (test: {CORPUS}/leak_eval.jsonl:1); "
        "kept there, set aside here",
    }
    assert (checked.train.n_passed, checked.validation.n_passed, checked.eval.n_passed) == (5, 2, 2)


def test_required_keys_and_text_answers(tmp_path: Path, tiny_model: Path) -> None:
    checked = _check(
        tmp_path / "json",
        tiny_model,
        train=ROWS / "json_targets.jsonl",
        eval=CORPUS / "leak_eval.jsonl",
        required_keys=["name", "price"],
    )
    assert [r.message for r in _quarantine(checked)][-1] == (
        f"{ROWS}/json_targets.jsonl:4: answer lacks required keys: has name"
    )
    text = _check(
        tmp_path / "text",
        tiny_model,
        train=ROWS / "json_targets.jsonl",
        eval=CORPUS / "leak_eval.jsonl",
        output_format="text",
    )
    assert text.rows_quarantined == 0
    assert "expect_column_values_to_be_json_parseable" not in {e["name"] for e in text.train.expectations}


def test_reasoning_answers_are_checked_after_the_think_block(tmp_path: Path, tiny_model: Path) -> None:
    rows = [
        {"input": f"<p>Product {i}</p>", "output": {"name": f"Product {i}"}, "reasoning": f"It says {i}."}
        for i in range(3)
    ] + [
        {
            "messages": [
                {"role": "user", "content": "<p>Product 9</p>"},
                {"role": "assistant", "content": "<think>hm</think>"},
            ]
        }
    ]
    train = tmp_path / "reasoning.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    checked = _check(tmp_path, tiny_model, train=train, eval=CORPUS / "leak_eval.jsonl", reasoning="wrap")
    assert [r.message for r in _quarantine(checked)] == [f"{train}:4: empty turn: messages[1] (assistant) has no text"]
    answers = [e.answer for e in read_examples(checked.train.clean_path)]
    assert answers == [f'<think>\nIt says {i}.\n</think>\n\n{{"name":"Product {i}"}}' for i in range(3)]


def test_a_row_the_chat_template_cannot_train_is_quarantined_naming_its_answer(
    tmp_path: Path, tiny_model: Path
) -> None:
    """QwQ's template drops an earlier answer's reasoning once more turns follow: that row cannot be one
    training sequence, so it is set aside (row, answer, reason); the single-answer rows train."""
    from tunepipe.tasks.integrations.llama_cpp import chat_templates_dir

    think = "<think>\nThe heading.\n</think>\n\n"
    turns = [
        [
            {"role": "user", "content": f"<p>Product {i}</p>"},
            {"role": "assistant", "content": f'{think}{{"name": "Product {i}"}}'},
        ]
        for i in range(4)
    ]
    rows = [{"messages": turns[0]}, {"messages": turns[1]}, {"messages": turns[2] + turns[3]}]
    train = tmp_path / "reasoning.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(
        train=train,
        eval=CORPUS / "leak_eval.jsonl",
        validation=CORPUS / "leak_validation.jsonl",
        min_rows=1,
        max_invalid_fraction=1.0,
    )
    model = ModelConfig(
        base=str(tiny_model),
        max_seq_length=256,
        chat_template=(chat_templates_dir() / "Qwen-QwQ-32B.jinja").read_text(encoding="utf-8"),
    )
    checked = check_dataset(
        load_dataset(cfg, tmp_path / "load"), cfg, resolve_base_model(model), model, tmp_path / "check"
    )
    (rejected,) = _quarantine(checked)
    assert (rejected.stage, rejected.line, rejected.field) == ("check", 3, "chat_template")
    assert rejected.reason.startswith(
        "the chat template renders the answer in messages[1].content without its reasoning once more turns follow"
    )
    assert checked.train.n_passed == 2 and checked.tokens.chat.reasoning == "keep"


def test_policy_fraction_fail_and_min_rows(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(DataCheckError) as caught:
        _check(
            tmp_path / "a",
            tiny_model,
            train=ROWS / "truncated.jsonl",
            eval=CORPUS / "leak_eval.jsonl",
            max_invalid_fraction=0.05,
        )
    message = str(caught.value)
    assert message.startswith(
        "data check failed: 2 of 9 rows (22.2%) were set aside, more than "
        "data.max_invalid_fraction 5.0%.\nFirst rows set aside:\n"
        f"  {ROWS}/truncated.jsonl:3: invalid JSON: Expecting ',' delimiter (column 62)\n"
    )
    assert str(caught.value.checked.quarantine_path) in message and str(caught.value.checked.data_docs) in message

    with pytest.raises(DataCheckError, match="1 of 7 rows are invalid and data.on_invalid is fail"):
        _check(
            tmp_path / "b",
            tiny_model,
            train=ROWS / "overlong.jsonl",
            eval=CORPUS / "leak_eval.jsonl",
            on_invalid="fail",
        )
    with pytest.raises(DataCheckError, match="2 training rows passed, data.min_rows is 20"):
        _check(tmp_path / "c", tiny_model, train=ROWS / "overlong.jsonl", eval=CORPUS / "leak_eval.jsonl", min_rows=20)


def test_data_docs_and_summary(tmp_path: Path, tiny_model: Path) -> None:
    checked = _check(tmp_path, tiny_model, train=ROWS / "overlong.jsonl", eval=CORPUS / "leak_eval.jsonl")
    docs = checked.data_docs.parent
    assert checked.data_docs.name == "index.html" and checked.data_docs.is_file()
    assert {p.name for p in (docs / "validations").iterdir()} == {
        "tunepipe_train",
        "tunepipe_validation",
        "tunepipe_eval",
    }
    page = next((docs / "validations" / "tunepipe_train").rglob("*.html")).read_text()
    assert "n_tokens" in page and "at most 128 tokens (model.max_seq_length)" in page
    summary = json.loads(checked.summary_path.read_text())
    assert summary["rows_read"] == 7 and summary["rows_quarantined"] == 1
    assert summary["files"][0] == {
        "source": str(ROWS / "overlong.jsonl"),
        "unit": "line",
        "rows_read": 3,
        "kept_train": 2,
        "kept_validation": 0,
        "kept_eval": 0,
        "quarantined": 1,
    }
    gx_train = summary["great_expectations"]["train"]
    assert gx_train["success"] is False and len(gx_train["results"]) == len(checked.train.expectations)


def test_check_command_prints_report_and_plan(tmp_path: Path, tiny_model: Path, capsys) -> None:
    from tunepipe.deployments.cli import main

    config = {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "ollama": {"model_name": "t"},
        "model": {"base": str(tiny_model), "max_seq_length": 128},
        "data": {
            "train": str(ROWS / "overlong.jsonl"),
            "eval": str(CORPUS / "leak_eval.jsonl"),
            "validation": str(CORPUS / "leak_validation.jsonl"),
            "min_rows": 1,
        },
        "train": {"batch_size": 1, "max_steps": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["check", str(path)]) == 1  # 1 of 7 rows set aside: above 5%
    out = capsys.readouterr().out
    assert f"set aside: {ROWS}/overlong.jsonl:2: 386 tokens > max_seq_length 128" in out
    assert "a run would fail: data check failed: 1 of 7 rows (14.3%) were set aside" in out

    assert main(["check", str(path), "--set", "data.max_invalid_fraction=0.25"]) == 0
    out = capsys.readouterr().out
    assert "Data Docs: " in out and "index.html" in out
    assert re.search(r"steps per epoch[ │]+2\b", out) and "4 (2.00 epochs)" in out
    assert re.search(r"rows \(train / validation / test\)[ │]+2 / 2 / 2", out)
    assert "memory estimate" in out and "GiB free (weights" in out and "cpu x1, fp32" in out
    assert re.search(r"gradient checkpointing[ │]+off", out)  # auto: the tiny model fits in memory

    config["data"]["train"] = str(CORPUS / "unusable" / "numbers.json")
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 1
    assert "numbers.json: a JSON array of numbers and strings" in capsys.readouterr().out


def test_a_one_row_file_is_too_small_to_hold_out_an_evaluation_split(tmp_path: Path, tiny_model: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"input": "<div>Kettle, $25</div>", "output": {"name": "Kettle"}}) + "\n")
    with pytest.raises(DataCheckError) as caught:
        _check(tmp_path, tiny_model, train=one)
    assert caught.value.checked.problems == [
        f"too few rows to hold out a {name} split: 1 valid row(s) reached the split (data.{key}_fraction 0.1, at "
        f"least 3 distinct rows needed for train, validation and test); add rows, or give held-out rows as data.{key}"
        for name, key in (("validation", "validation"), ("test", "eval"))
    ]


def test_check_command_prints_whole_paths_and_warns_when_steps_repeat_the_data(
    tmp_path: Path, tiny_model: Path, capsys
) -> None:
    from tunepipe.deployments.cli import main

    train = tmp_path / "a-folder-name-long-enough-to-wrap-the-file-column" / "products_training_rows_2026-11.jsonl"
    train.parent.mkdir()
    train.write_text(
        "".join(
            json.dumps({"input": f"<div>Product {i}</div>", "output": {"name": f"Product {i}"}}) + "\n"
            for i in range(3)
        )
    )
    config = {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "ollama": {"model_name": "t"},
        "model": {"base": str(tiny_model), "max_seq_length": 128},
        "data": {
            "train": str(train),
            "eval": str(CORPUS / "leak_eval.jsonl"),
            "validation": str(CORPUS / "leak_validation.jsonl"),
            "min_rows": 1,
        },
        "train": {"batch_size": 1, "max_steps": 400},
        "gate": {"rules": {"exact_match": {"min": 0.5}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    data_table = out.split("rows set aside")[0]
    assert str(train) in data_table and "…" not in data_table
    assert (
        "warning: train.max_steps=400 goes over the 3 training rows 133 times (more than 50): the model will "
        "likely learn them by heart; use more rows or fewer steps"
    ) in out
    # 2 test rows can show no candidate better than a champion.
    assert (
        "warning: the test split's 2 examples are too few for the champion rule on exact_match (margin 0): no "
        "candidate passes it 80% of the time, however good"
    ) in " ".join(out.split())


@pytest.mark.slow  # trains the tiny model
def test_run_plan_estimates_training_time_from_the_speed_training_reached_here(
    tmp_path: Path, tiny_model: Path, capsys
) -> None:
    import statistics

    from prefect.logging import disable_run_logger

    from tunepipe.deployments.cli import main
    from tunepipe.deployments.run_plan import check_run
    from tunepipe.tasks.data.check import check_data
    from tunepipe.tasks.data.format import format_data
    from tunepipe.tasks.data.load import data_fingerprint, load_data
    from tunepipe.tasks.runtime.config import load_config
    from tunepipe.tasks.train.task import train

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"input": f"<div>Product {i}</div>", "output": {"name": f"Product {i}"}}) + "\n"
            for i in range(8)
        )
    )
    config = {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "ollama": {"model_name": "t"},
        "model": {"base": str(tiny_model), "max_seq_length": 128},
        "data": {"train": str(rows), "eval": str(CORPUS / "leak_eval.jsonl"), "min_rows": 1},
        "train": {"batch_size": 2, "max_steps": 3, "logging_steps": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0
    plan_table = capsys.readouterr().out.split("run plan")[1]
    values = " ".join(plan_table.split())
    assert (
        "none yet: this base model has not trained on cpu x1 in this workdir; the first run's speed sets it" in values
    )

    # One real training on this machine, as the flow's train stage runs it, in the run's workdir.
    cfg = load_config(path)
    base = resolve_base_model(cfg.model)
    loaded = load_data.fn(cfg.data, data_fingerprint(cfg.data), cfg.workdir)
    checked = check_data.fn(loaded, cfg.data, base, cfg.model, cfg.workdir)
    formatted = format_data.fn(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)
    with disable_run_logger():
        trained = train.fn(formatted, base, cfg.model, cfg.lora, cfg.train, cfg.workdir)
    rate = statistics.median(point.tokens_per_s for point in trained.loss_history)

    longer = load_config(path, ["train.max_steps=300"])
    _, plan = check_run(longer)
    assert plan.time_estimate.tokens_per_s == rate and plan.time_estimate.measured_in == trained.adapter_dir.parent
    assert plan.time_estimate.seconds == pytest.approx(
        300 * 2 * formatted.train.n_tokens / formatted.train.n_rows / rate
    )
    # Another mode is another speed: full fine-tuning has no estimate from a LoRA run.
    _, full = check_run(load_config(path, ["train.mode=full"]))
    assert full.time_estimate is None


def test_preference_rows_are_checked_by_the_same_suite(tmp_path: Path, tiny_model: Path) -> None:
    """A rated-bad answer need not be JSON (it is what the model must stop writing); a DPO row's rejected answer
    must have text and differ from the chosen one; both kinds are named by file, line and field."""
    train = tmp_path / "prefs.jsonl"
    good = '{"name": "A"}'
    train.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "p1", "completion": good, "label": True},
                {"prompt": "p2", "completion": "<b>html echoed</b>", "label": False},
                {"prompt": "p3", "chosen": good, "rejected": "<i>wrong</i>"},
                {"prompt": "p4", "chosen": good, "rejected": " "},
                {"prompt": "p5", "chosen": good, "rejected": good},
                {"prompt": "p6", "completion": "not json", "label": True},
            ]
        )
        + "\n"
    )
    checked = _check(tmp_path, tiny_model, train=train, eval=CORPUS / "leak_eval.jsonl", output_format="json")
    assert [(r.line, r.field, r.reason) for r in _quarantine(checked)] == [
        (4, "rejected", "rejected answer is empty"),
        (5, "rejected", "rejected answer is the same as the chosen answer"),
        (6, "answer", "answer is not valid JSON: 'not json'"),
    ]
    assert [e.answer for e in read_examples(checked.train.clean_path)] == [good, good]
    assert [e.answer for e in read_examples(checked.train.undesirable_path)] == ["<b>html echoed</b>"]
