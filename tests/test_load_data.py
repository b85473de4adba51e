import json
import random
from pathlib import Path

import pytest

from tasks.config import DataConfig
from tasks.examples import Message, read_examples
from tasks.load_data import (
    RecordError,
    Rejection,
    fingerprint_files,
    load_dataset,
    parse_record,
    read_jsonl,
)


def _roles(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _chat(*turns: str) -> dict:
    """OpenAI record from "role:content" strings."""
    return {"messages": [dict(zip(("role", "content"), turn.split(":", 1), strict=True)) for turn in turns]}


def _pairs(n: int) -> list[str]:
    return [json.dumps({"input": f"question {i}", "output": {"answer": i}}) for i in range(n)]


# --- the four formats ---------------------------------------------------------------------------------


def test_plain_pair_with_json_output() -> None:
    messages = parse_record({"input": "<p>Laptop</p>", "output": {"name": "Läptop", "n": [1]}}, None)
    assert _roles(messages) == [("user", "<p>Laptop</p>"), ("assistant", '{"name": "Läptop", "n": [1]}')]


def test_plain_pair_with_string_output_and_own_system() -> None:
    messages = parse_record({"input": "hi", "output": "hello", "system": "Be brief."}, "ignored")
    assert _roles(messages) == [("system", "Be brief."), ("user", "hi"), ("assistant", "hello")]


def test_alpaca_joins_instruction_and_input() -> None:
    record = {"instruction": "Extract the product.", "input": "<p>Laptop</p>", "output": ["Laptop"]}
    assert _roles(parse_record(record, None)) == [
        ("user", "Extract the product.\n\n<p>Laptop</p>"),
        ("assistant", '["Laptop"]'),
    ]
    assert _roles(parse_record({"instruction": "Say hi.", "input": "", "output": "hi"}, None))[0] == ("user", "Say hi.")


def test_sharegpt() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert _roles(parse_record(record, "other")) == [
        ("system", "S"),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
    ]


def test_openai_messages() -> None:
    record = _chat("user:Q", "assistant:A")
    assert _roles(parse_record(record, None)) == [("user", "Q"), ("assistant", "A")]


def test_system_prompt_added_only_when_missing() -> None:
    record = _chat("user:Q", "assistant:A")
    assert _roles(parse_record(record, "Extract JSON."))[0] == ("system", "Extract JSON.")
    assert _roles(parse_record({"input": "Q", "output": "A"}, "Extract JSON."))[0] == ("system", "Extract JSON.")
    own = {"messages": [{"role": "system", "content": "Mine"}, *record["messages"]]}
    assert _roles(parse_record(own, "Extract JSON.")) == [("system", "Mine"), ("user", "Q"), ("assistant", "A")]


# --- record errors name the field ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"input": "Q"}, "output", "missing"),
        ({"input": "Q", "output": ""}, "output", "empty"),
        ({"input": "Q", "output": 3}, "output", "string"),
        ({"input": 5, "output": "A"}, "input", "string"),
        ({"instruction": "", "output": "A"}, "instruction", "empty"),
        ({"question": "Q", "answer": "A"}, "<record>", "unrecognised format"),
        ({"messages": "hi"}, "messages", "list"),
        ({"messages": []}, "messages", "empty"),
        (_chat("user:Q", "bot:A"), "messages[1].role", "bot"),
        ({"messages": [{"role": ["user"], "content": "Q"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"content": "Q"}]}, "messages[0].role", "missing"),
        ({"instruction": "Do", "input": {"x": 1}, "output": "A"}, "input", "object"),
        (_chat("user:Q", "assistant: "), "messages[1].content", "empty"),
        (_chat("user:Q"), "messages[0].role", "last message"),
        (_chat("user:Q", "user:Q"), "messages[1].role", "alternate"),
        (_chat("user:Q", "system:S"), "messages[1].role", "system"),
        (_chat("system:S", "user:Q", "assistant:A", "assistant:B"), "messages[3].role", "alternate"),
        ({"conversations": [{"from": "user", "value": "Q"}]}, "conversations[0].from", "'human'"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]}, "conversations[1].value", "missing"),
    ],
)
def test_record_errors_name_the_field(record: dict, field: str, words: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(record, None)
    assert caught.value.field == field
    assert words in caught.value.message


# --- files --------------------------------------------------------------------------------------------


def test_read_jsonl_rejects_bad_lines_with_line_field_and_raw_text(tmp_path: Path) -> None:
    lines = [
        json.dumps({"input": "Q1", "output": {"a": 1}}),
        "",  # blank: skipped, but still counted for line numbers
        '{"input": "Q3", "output": ',  # bad JSON on line 3
        json.dumps({"input": "Q4"}),
        json.dumps(_chat("user:Q", "robot:A")),
        json.dumps(_chat("assistant:A", "user:Q")),
        json.dumps([1, 2]),
        '{"input": "Q8", "output": {"price": NaN}}',
        json.dumps({"instruction": "Do it", "output": "done"}),
    ]
    path = _write_lines(tmp_path / "data.jsonl", lines)
    examples, rejections = read_jsonl(path, None)

    assert [(e.line, e.answer) for e in examples] == [(1, '{"a": 1}'), (9, "done")]
    assert all(e.source == str(path) for e in examples)
    got = {r.line: r for r in rejections}
    assert sorted(got) == [3, 4, 5, 6, 7, 8]
    assert (got[3].field, got[3].reason.startswith("invalid JSON")) == ("<line>", True)
    assert (got[4].field, got[4].reason) == ("output", "missing")
    assert got[5].field == "messages[1].role"
    assert got[6].field == "messages[0].role"  # the conversation starts with the assistant
    assert (got[7].field, "array" in got[7].reason) == ("<line>", True)
    assert (got[8].field, "NaN" in got[8].reason) == ("<line>", True)
    for rejection in rejections:
        assert rejection.source == str(path)
        assert rejection.raw == lines[rejection.line - 1]


def test_read_jsonl_keeps_undecodable_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    # A byte-order mark, Windows line ends and one byte that is not UTF-8.
    path.write_bytes(b'\xef\xbb\xbf{"input": "Q", "output": "A"}\r\n{"input": "\xff", "output": "A"}\r\n')
    examples, rejections = read_jsonl(path, None)
    assert [e.line for e in examples] == [1]
    assert [(r.line, r.field) for r in rejections] == [(2, "<line>")]
    assert "UTF-8" in rejections[0].reason
    assert rejections[0].raw == '{"input": "\\xff", "output": "A"}'


def test_conversation_ending_with_the_user_is_rejected(tmp_path: Path) -> None:
    turns = [("human", "Q"), ("gpt", "A"), ("human", "Q2")]
    record = {"conversations": [{"from": who, "value": value} for who, value in turns]}
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(record)])
    _, rejections = read_jsonl(path, None)
    assert [(r.line, r.field) for r in rejections] == [(1, "conversations[2].from")]
    assert "assistant" in rejections[0].reason


def test_ids_are_content_hashes(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps({"input": "Q", "output": "A"})] * 2 + _pairs(1))
    examples, _ = read_jsonl(path, None)
    assert examples[0].id == examples[1].id != examples[2].id
    assert len(examples[0].id) == 16 and int(examples[0].id, 16) >= 0


def test_empty_file_is_not_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [])
    assert read_jsonl(path, None) == ([], [])


def test_load_dataset_writes_train_eval_and_quarantine(tmp_path: Path) -> None:
    train = _write_lines(tmp_path / "train.jsonl", _pairs(30) + ["not json"])
    eval_ = _write_lines(tmp_path / "eval.jsonl", _pairs(3) + [json.dumps({"input": "Q"})])
    cfg = DataConfig(train=train, eval=eval_, system_prompt="Answer in JSON.")
    loaded = load_dataset(cfg, tmp_path / "out")

    assert (loaded.n_train, loaded.n_eval, loaded.n_rejected) == (30, 3, 2)
    written = list(read_examples(loaded.train_path))
    assert len(written) == 30 and written[0].messages[0].content == "Answer in JSON."
    assert len(list(read_examples(loaded.eval_path))) == 3
    quarantined = [Rejection.model_validate_json(line) for line in loaded.quarantine_path.read_text().splitlines()]
    assert [(r.source, r.line, r.field) for r in quarantined] == [
        (str(train), 31, "<line>"),
        (str(eval_), 4, "output"),
    ]
    assert quarantined[0].raw == "not json"


def test_quarantine_file_written_even_when_empty(tmp_path: Path) -> None:
    loaded = load_dataset(DataConfig(train=_write_lines(tmp_path / "t.jsonl", _pairs(20))), tmp_path / "out")
    assert loaded.n_rejected == 0
    assert loaded.quarantine_path.read_text() == ""


def test_missing_file_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.train: file not found: .*nope\.jsonl"):
        load_dataset(DataConfig(train=tmp_path / "nope.jsonl"), tmp_path / "out")
    train = _write_lines(tmp_path / "t.jsonl", _pairs(3))
    with pytest.raises(FileNotFoundError, match=r"data\.eval: file not found"):
        load_dataset(DataConfig(train=train, eval=tmp_path / "missing.jsonl"), tmp_path / "out")


def test_split_is_deterministic_and_independent_of_file_order(tmp_path: Path) -> None:
    lines = _pairs(200)
    shuffled = lines[:]
    random.Random(1).shuffle(shuffled)
    a = load_dataset(DataConfig(train=_write_lines(tmp_path / "a.jsonl", lines), eval_fraction=0.2), tmp_path / "a")
    b = load_dataset(DataConfig(train=_write_lines(tmp_path / "b.jsonl", shuffled), eval_fraction=0.2), tmp_path / "b")

    def ids(path: Path) -> set[str]:
        return {e.id for e in read_examples(path)}

    assert ids(a.eval_path) == ids(b.eval_path)
    assert ids(a.train_path) == ids(b.train_path)
    assert not ids(a.eval_path) & ids(a.train_path)
    assert a.n_train + a.n_eval == 200 and 20 <= a.n_eval <= 60
    other_seed = load_dataset(DataConfig(train=tmp_path / "a.jsonl", eval_fraction=0.2, seed=7), tmp_path / "c")
    assert ids(other_seed.eval_path) != ids(a.eval_path)


def test_split_never_leaves_a_side_empty(tmp_path: Path) -> None:
    cfg = DataConfig(train=_write_lines(tmp_path / "t.jsonl", _pairs(2)), eval_fraction=0.01)
    loaded = load_dataset(cfg, tmp_path / "o")
    assert (loaded.n_train, loaded.n_eval) == (1, 1)


def test_fingerprint_changes_with_bytes_and_config(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "t.jsonl", _pairs(5))
    cfg = DataConfig(train=path)
    before = load_dataset(cfg, tmp_path / "o").fingerprint
    assert load_dataset(cfg, tmp_path / "o").fingerprint == before
    assert fingerprint_files([path], "x") != fingerprint_files([path], "y")
    path.write_bytes(path.read_bytes().replace(b"question 4", b"question 5"))
    assert load_dataset(cfg, tmp_path / "o").fingerprint != before
