import json
import random
from pathlib import Path

import pytest

from tunepipe.tasks.chat.examples import Message, read_examples
from tunepipe.tasks.data.containers import DataFileError, DataSource
from tunepipe.tasks.data.files import Rejection, fingerprint_files, read_file
from tunepipe.tasks.data.load import load_dataset, split_band
from tunepipe.tasks.data.shapes import Normaliser, RecordError, example_id, parse_record
from tunepipe.tasks.runtime.config import DataConfig

CORPUS = Path(__file__).parent / "corpus"


def read_jsonl(path: Path, system_prompt: str | None = None):
    read = read_file(DataSource(path=path), Normaliser(None, system_prompt))
    return read.examples, read.rejections


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
    messages = parse_record({"input": "<p>Laptop</p>", "output": {"name": "Läptop", "n": [1]}})
    # Compact, key order kept, non-ASCII as is.
    assert _roles(messages) == [("user", "<p>Laptop</p>"), ("assistant", '{"name":"Läptop","n":[1]}')]


def test_plain_pair_with_string_output_and_own_system() -> None:
    messages = parse_record({"input": "hi", "output": "hello", "system": "Be brief."}, system_prompt="ignored")
    assert _roles(messages) == [("system", "Be brief."), ("user", "hi"), ("assistant", "hello")]


def test_alpaca_joins_instruction_and_input() -> None:
    record = {"instruction": "Extract the product.", "input": "<p>Laptop</p>", "output": ["Laptop"]}
    assert _roles(parse_record(record)) == [
        ("user", "Extract the product.\n\n<p>Laptop</p>"),
        ("assistant", '["Laptop"]'),
    ]
    assert _roles(parse_record({"instruction": "Say hi.", "input": "", "output": "hi"}))[0] == ("user", "Say hi.")


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
    assert _roles(parse_record(record, system_prompt="other")) == [
        ("system", "S"),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
    ]


def test_openai_messages() -> None:
    record = _chat("user:Q", "assistant:A")
    assert _roles(parse_record(record)) == [("user", "Q"), ("assistant", "A")]


def test_system_prompt_added_only_when_missing() -> None:
    record = _chat("user:Q", "assistant:A")
    assert _roles(parse_record(record, system_prompt="Extract JSON."))[0] == ("system", "Extract JSON.")
    assert _roles(parse_record({"input": "Q", "output": "A"}, system_prompt="Extract JSON."))[0] == (
        "system",
        "Extract JSON.",
    )
    own = {"messages": [{"role": "system", "content": "Mine"}, *record["messages"]]}
    assert _roles(parse_record(own, system_prompt="Extract JSON.")) == [
        ("system", "Mine"),
        ("user", "Q"),
        ("assistant", "A"),
    ]


# --- record errors name the field ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"input": "Q"}, "output", 'missing field "output"'),
        ({"input": "Q", "output": 3}, "output", 'field "output" must be a string or a JSON object, got number'),
        ({"input": 5, "output": "A"}, "input", 'field "input" must be a string, got number'),
        ({"input": None, "output": "A"}, "input", 'field "input" is null'),
        (
            {"question": "Q", "answer": "A"},
            "<record>",
            'unknown shape: keys "question", "answer"; expected '
            "'messages' (openai), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), 'input' + 'output' "
            "(pairs) or 'prompt' + 'completion' / 'chosen' + 'rejected' (trl)",
        ),
        ({"messages": "hi"}, "messages", 'field "messages" must be a list of turns, got string'),
        ({"messages": []}, "messages", 'field "messages" must not be empty'),
        (
            _chat("user:Q", "bot:A"),
            "messages[1].role",
            'field "messages[1].role" must be one of "system", "user", "assistant"; got "bot"',
        ),
        (
            {"messages": [{"role": ["user"], "content": "Q"}]},
            "messages[0].role",
            'field "messages[0].role" must be one of "system", "user", "assistant"; got ["user"]',
        ),
        (
            {"messages": [{"content": "Q"}]},
            "messages[0].role",
            'field "messages[0].role" must be one of "system", "user", "assistant"; missing',
        ),
        (
            {"instruction": "Do", "input": {"x": 1}, "output": "A"},
            "input",
            'field "input" must be a string, got object',
        ),
        (
            {"conversations": [{"from": "user", "value": "Q"}]},
            "conversations[0].from",
            'field "conversations[0].from" must be one of "system", "human", "gpt"; got "user"',
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]},
            "conversations[1].value",
            'missing field "conversations[1].value"',
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{}"}]},
            "conversations[1].from",
            'function-call turns ("function_call") are not supported yet (tools); remove the tool turns or the row',
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": None, "tool_calls": [{}]},
                ]
            },
            "messages[1].role",
            'function-call turns ("assistant") are not supported yet (tools); remove the tool turns or the row',
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                "tools": '[{"name": "f"}]',
            },
            "tools",
            'field "tools": tool definitions are not supported yet; remove them or the row',
        ),
        (
            {"instruction": "Q", "output": "A", "history": [["only one"]]},
            "history[0]",
            'field "history[0]" must be a [prompt, answer] pair of strings',
        ),
    ],
)
def test_record_errors_name_the_field(record: dict, field: str, message: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(record)
    assert (caught.value.field, caught.value.message) == (field, message)


def test_order_and_empty_turns_are_left_to_the_data_check() -> None:
    # Representable conversations load; the Great Expectations suite names what is wrong with them.
    assert _roles(parse_record(_chat("user:Q", "user:Q"))) == [("user", "Q"), ("user", "Q")]
    assert _roles(parse_record({"input": "Q", "output": ""})) == [("user", "Q"), ("assistant", "")]


def test_named_shape_quarantines_other_shapes() -> None:
    assert _roles(parse_record({"instruction": "Q", "output": "A"}, shape="alpaca")) == [
        ("user", "Q"),
        ("assistant", "A"),
    ]
    with pytest.raises(RecordError) as caught:
        parse_record(_chat("user:Q", "assistant:A"), shape="alpaca")
    assert caught.value.message == 'not a alpaca record: no field "instruction" (keys: "messages")'


def test_alpaca_history_and_system() -> None:
    record = {"instruction": "Q2", "output": "A2", "system": "S", "history": [["Q1", "A1"]]}
    assert _roles(parse_record(record)) == [
        ("system", "S"),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
    ]


def test_sharegpt_system_column_and_role_content_turns() -> None:
    record = {
        "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "system": "S",
        "tools": "",
    }
    assert _roles(parse_record(record)) == [("system", "S"), ("user", "Q"), ("assistant", "A")]


# --- reasoning ----------------------------------------------------------------------------------------

THINKING = _chat("user:Q", 'assistant:<think>\nfirst this\n</think>\n\n{"a": 1}')
FIELD = {
    "messages": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "{}", "reasoning_content": "because"},
    ]
}


def test_reasoning_keep_leaves_answers_as_written() -> None:
    assert parse_record(THINKING, reasoning="keep")[-1].content == '<think>\nfirst this\n</think>\n\n{"a": 1}'
    with pytest.raises(RecordError, match="would be lost with data.reasoning: keep"):
        parse_record(FIELD, reasoning="keep")


def test_reasoning_strip_drops_blocks_and_fields() -> None:
    assert parse_record(THINKING, reasoning="strip")[-1].content == '{"a": 1}'
    assert parse_record(FIELD, reasoning="strip")[-1].content == "{}"
    pair = {"input": "Q", "output": {"a": 1}, "reasoning": "why"}
    assert parse_record(pair, reasoning="strip")[-1].content == '{"a":1}'


@pytest.mark.parametrize("policy", ["keep", "strip", "wrap"])
def test_a_stray_closing_think_tag_is_an_error_naming_the_field(policy: str) -> None:
    """Text before a `</think>` nothing opened would be taken for reasoning: stripped, or judged apart."""
    stray = _chat("user:Q", 'assistant:The kettle.</think>\n\n{"a": 1}')
    with pytest.raises(
        RecordError,
        match=r'^messages\[1\]\.content: field "messages\[1\]\.content" has a '
        r"</think> with no <think> before it",
    ) as excinfo:
        parse_record(stray, reasoning=policy)
    assert excinfo.value.field == "messages[1].content"
    pair = {"input": "Q", "output": "why</think>{}"}
    with pytest.raises(RecordError, match='field "output" has a </think>'):
        parse_record(pair, reasoning=policy)


def test_reasoning_wrap_writes_one_layout() -> None:
    assert parse_record(FIELD, reasoning="wrap")[-1].content == "<think>\nbecause\n</think>\n\n{}"
    assert parse_record(THINKING, reasoning="wrap")[-1].content == '<think>\nfirst this\n</think>\n\n{"a": 1}'
    pair = {"input": "Q", "output": {"a": 1}, "reasoning": "why"}
    assert parse_record(pair, reasoning="wrap")[-1].content == '<think>\nwhy\n</think>\n\n{"a":1}'
    with pytest.raises(RecordError, match="and a <think> block"):
        parse_record(
            {**THINKING, "messages": [*THINKING["messages"][:1], {**THINKING["messages"][1], "reasoning": "x"}]},
            reasoning="wrap",
        )


# --- files --------------------------------------------------------------------------------------------


def test_read_jsonl_rejects_bad_lines_with_line_field_and_raw_text(tmp_path: Path) -> None:
    lines = [
        json.dumps({"input": "Q1", "output": {"a": 1}}),
        "",  # blank: skipped, but still counted for line numbers
        '{"input": "Q3", "output": ',  # bad JSON on line 3
        json.dumps({"input": "Q4"}),
        json.dumps(_chat("user:Q", "robot:A")),
        json.dumps([1, 2]),
        '{"input": "Q7", "output": {"price": NaN}}',
        json.dumps({"instruction": "Do it", "output": "done"}),
    ]
    path = _write_lines(tmp_path / "data.jsonl", lines)
    examples, rejections = read_jsonl(path)

    assert [(e.line, e.answer) for e in examples] == [(1, '{"a":1}'), (8, "done")]
    assert all(e.source == str(path) and e.unit == "line" for e in examples)
    assert [(r.field, r.message) for r in rejections] == [
        ("<line>", f"{path}:3: invalid JSON: Expecting value (column 27)"),
        ("output", f'{path}:4: missing field "output"'),
        (
            "messages[1].role",
            f'{path}:5: field "messages[1].role" must be one of "system", "user", "assistant"; got "robot"',
        ),
        ("<line>", f"{path}:6: expected a JSON object, got array"),
        ("<line>", f"{path}:7: invalid JSON: NaN is not valid JSON"),
    ]
    for rejection in rejections:
        assert rejection.source == str(path)
        assert rejection.raw == lines[rejection.line - 1]


def test_read_jsonl_keeps_undecodable_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    # A byte-order mark, Windows line ends and one byte that is not UTF-8.
    path.write_bytes(b'\xef\xbb\xbf{"input": "Q", "output": "A"}\r\n{"input": "\xff", "output": "A"}\r\n')
    examples, rejections = read_jsonl(path)
    assert [(e.line, e.answer) for e in examples] == [(1, "A")]
    assert [r.message for r in rejections] == [f"{path}:2: not valid UTF-8: byte 0xff at byte 12 of the line"]
    assert rejections[0].raw == '{"input": "\\xff", "output": "A"}'


def test_ids_are_content_hashes(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps({"input": "Q", "output": "A"})] * 2 + _pairs(1))
    examples, _ = read_jsonl(path)
    assert examples[0].id == examples[1].id != examples[2].id
    assert len(examples[0].id) == 16 and int(examples[0].id, 16) >= 0


# --- containers -------------------------------------------------------------------------------------------


def test_json_array_csv_and_parquet_number_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([{"instruction": "Q1", "output": {"b": 1, "a": 2}}, {"instruction": "Q2"}], indent=2))
    table = tmp_path / "pairs.csv"
    table.write_text('input,output,system\r\nQ1,A1,\r\nQ2,"{""x"": 1}",Be brief.\r\n', encoding="utf-8-sig")
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([_chat("user:Q1", "assistant:A1"), {"messages": None}]), parquet)

    examples, rejections = read_jsonl(array)
    assert [(e.line, e.unit, e.answer) for e in examples] == [(1, "row", '{"b":1,"a":2}')]
    assert [r.message for r in rejections] == [f'{array} row 2: missing field "output"']
    examples, rejections = read_jsonl(table)
    assert [(e.where, _roles(e.messages)) for e in examples] == [
        (f"{table} row 1", [("user", "Q1"), ("assistant", "A1")]),
        (f"{table} row 2", [("system", "Be brief."), ("user", "Q2"), ("assistant", '{"x": 1}')]),
    ]
    examples, rejections = read_jsonl(parquet)
    assert [_roles(e.messages) for e in examples] == [[("user", "Q1"), ("assistant", "A1")]]
    assert [r.message for r in rejections] == [f'{parquet} row 2: field "messages" must be a list of turns, got null']


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.json", _pairs(2))
    assert [e.where for e in read_jsonl(path)[0]] == [f"{path}:1", f"{path}:2"]
    path.write_text(json.dumps({"input": "Q", "output": "A"}, indent=2))
    with pytest.raises(DataFileError, match="one JSON object, expected an array of records or one record per line"):
        read_jsonl(path)


def test_folder_glob_and_llama_factory_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _write_lines(folder / "a.jsonl", _pairs(3))
    (folder / "b.json").write_text(json.dumps([{"input": "Q", "output": "A"}]))
    (folder / "notes.txt").write_text("not data")
    by_folder = load_dataset(DataConfig(train=folder, eval=folder / "b.json"), tmp_path / "o1")
    assert [(f.source, f.rows_read) for f in by_folder.files] == [
        (str(folder / "a.jsonl"), 3),
        (str(folder / "b.json"), 1),
        (str(folder / "b.json"), 1),
    ]
    by_glob = load_dataset(DataConfig(train=folder / "*.jsonl", eval=folder / "b.json"), tmp_path / "o2")
    assert (by_glob.n_train + by_glob.n_validation, by_glob.n_eval) == (3, 1)

    llama_factory = load_dataset(DataConfig(train=CORPUS / "llama_factory", eval_fraction=0.5), tmp_path / "o3")
    examples = [*read_examples(llama_factory.train_path), *read_examples(llama_factory.eval_path)]
    assert sorted(_roles(e.messages)[-2][1] for e in examples) == [
        "<p>Product 402</p>",
        "Extract the product.\n\n<p>Product 400</p>",
        "Extract the product.\n\n<p>Product 401</p>",
    ]
    assert any(_roles(e.messages)[0] == ("system", "You extract JSON.") for e in examples)
    (rejected,) = [
        Rejection.model_validate_json(line) for line in llama_factory.quarantine_path.read_text().splitlines()
    ]
    assert rejected.message == (
        f'{CORPUS / "llama_factory" / "chat.jsonl"}:2: function-call turns ("function_call") '
        "are not supported yet (tools); remove the tool turns or the row"
    )
    only_chat = DataConfig(train=CORPUS / "llama_factory", datasets=["products_chat"], eval_fraction=0.5)
    assert [f.source for f in load_dataset(only_chat, tmp_path / "o4").files] == [
        str(CORPUS / "llama_factory" / "chat.jsonl")
    ]
    with pytest.raises(DataFileError, match=r"no dataset named 'nope' \(data.datasets\)"):
        load_dataset(DataConfig(train=CORPUS / "llama_factory", datasets=["nope"]), tmp_path / "o5")


def test_llama_factory_entries_that_cannot_be_read_offline(tmp_path: Path) -> None:
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"remote": {"hf_hub_url": "someone/data"}}))
    with pytest.raises(DataFileError, match="hf_hub_url: tunepipe reads local files only"):
        load_dataset(DataConfig(train=tmp_path), tmp_path / "out")


UNUSABLE = {
    "broken_array.json": "invalid JSON: Expecting ',' delimiter (line 2 column 17); a JSON array must parse as a whole",
    "empty.jsonl": "empty file: no records",
    "empty_array.json": "empty file: no records",
    "latin1.jsonl": "not UTF-8 text (line 1: byte 0xe9 at byte 15 of the line); save it as UTF-8",
    "numbers.json": "a JSON array of numbers and strings; expected JSON objects, one record each",
    "unknown_shape.jsonl": 'unknown shape (the first record has keys "question", "answer"); expected \'messages\' '
    "(openai), 'conversations' (sharegpt), 'instruction' + 'output' (alpaca), 'input' + "
    "'output' (pairs) or 'prompt' + 'completion' / 'chosen' + 'rejected' (trl), or a "
    "LLaMA-Factory dataset_info.json that names the columns",
    "utf16.json": "UTF-16 text (byte-order mark FF FE); save it as UTF-8",
}


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_unusable_file_fails_with_one_message_naming_it(name: str, tmp_path: Path) -> None:
    path = CORPUS / "unusable" / name
    with pytest.raises(DataFileError) as caught:
        load_dataset(DataConfig(train=path), tmp_path / "out")
    assert str(caught.value) == f"{path}: {UNUSABLE[name]}"


def test_every_unusable_file_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as caught:
        load_dataset(DataConfig(train=CORPUS / "unusable"), tmp_path / "out")
    assert str(caught.value).splitlines() == [
        f"{CORPUS / 'unusable' / name}: {UNUSABLE[name]}" for name in sorted(UNUSABLE)
    ]


def test_load_dataset_writes_train_eval_and_quarantine(tmp_path: Path) -> None:
    train = _write_lines(tmp_path / "train.jsonl", _pairs(30) + ["not json"])
    eval_ = _write_lines(tmp_path / "eval.jsonl", _pairs(3) + [json.dumps({"input": "Q"})])
    cfg = DataConfig(train=train, eval=eval_, system_prompt="Answer in JSON.")
    loaded = load_dataset(cfg, tmp_path / "out")

    # The test split is the eval file; validation is split off the training rows.
    assert (loaded.n_train + loaded.n_validation, loaded.n_eval, loaded.n_rejected) == (30, 3, 2)
    assert loaded.n_validation >= 1
    written = list(read_examples(loaded.train_path)) + list(read_examples(loaded.validation_path))
    assert len(written) == 30 and written[0].messages[0].content == "Answer in JSON."
    assert len(list(read_examples(loaded.eval_path))) == 3
    quarantined = [Rejection.model_validate_json(line) for line in loaded.quarantine_path.read_text().splitlines()]
    assert [(r.source, r.line, r.field) for r in quarantined] == [
        (str(train), 31, "<line>"),
        (str(eval_), 4, "output"),
    ]
    assert quarantined[0].raw == "not json"
    assert [(f.source, f.rows_read, f.rows_rejected) for f in loaded.files] == [(str(train), 31, 1), (str(eval_), 4, 1)]


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

    for path in ("train_path", "validation_path", "eval_path"):
        assert ids(getattr(a, path)) == ids(getattr(b, path))
    assert not ids(a.eval_path) & ids(a.train_path)
    assert not ids(a.validation_path) & (ids(a.train_path) | ids(a.eval_path))
    assert a.n_train + a.n_validation + a.n_eval == 200 and 20 <= a.n_eval <= 60 and 5 <= a.n_validation <= 40
    other_seed = load_dataset(DataConfig(train=tmp_path / "a.jsonl", eval_fraction=0.2, seed=7), tmp_path / "c")
    assert ids(other_seed.eval_path) != ids(a.eval_path)


def test_a_questions_side_is_its_hash_band_whichever_splits_are_given(tmp_path: Path) -> None:
    """Test below eval_fraction, validation in the band above it, train beyond; a band whose split comes as
    files trains instead, so giving data.eval never moves a validation row."""
    lines = _pairs(300)
    train = _write_lines(tmp_path / "t.jsonl", lines)
    test_file = _write_lines(tmp_path / "test.jsonl", [json.dumps({"input": "test q", "output": {"a": 0}})])
    valid_file = _write_lines(tmp_path / "valid.jsonl", [json.dumps({"input": "valid q", "output": {"a": 0}})])
    ids = {line: example_id(parse_record(json.loads(line))) for line in lines}
    bands = {
        line: split_band(ids[line], DataConfig(train=train, eval_fraction=0.2, validation_fraction=0.3))
        for line in lines
    }
    assert {band: sum(b == band for b in bands.values()) > 30 for band in ("train", "validation", "test")} == {
        "train": True,
        "validation": True,
        "test": True,
    }

    def sides(**given) -> dict[str, str]:
        loaded = load_dataset(
            DataConfig(train=train, eval_fraction=0.2, validation_fraction=0.3, **given), tmp_path / str(sorted(given))
        )
        found = {}
        for side, path in (
            ("train", loaded.train_path),
            ("validation", loaded.validation_path),
            ("test", loaded.eval_path),
        ):
            found |= {e.messages[-2].content: side for e in read_examples(path)}
        return found

    def expected(taken: set[str]) -> dict[str, str]:
        return {json.loads(line)["input"]: band if band in taken else "train" for line, band in bands.items()}

    assert sides() == expected({"train", "validation", "test"})
    assert sides(eval=test_file) == expected({"train", "validation"}) | {"test q": "test"}
    assert sides(validation=valid_file) == expected({"train", "test"}) | {"valid q": "validation"}


def test_split_never_leaves_a_side_empty(tmp_path: Path) -> None:
    cfg = DataConfig(train=_write_lines(tmp_path / "t.jsonl", _pairs(3)), eval_fraction=0.01, validation_fraction=0.01)
    loaded = load_dataset(cfg, tmp_path / "o")
    assert (loaded.n_train, loaded.n_validation, loaded.n_eval) == (1, 1, 1)


def test_fractions_must_leave_training_rows() -> None:
    with pytest.raises(ValueError, match="leave no training rows"):
        DataConfig(train="t.jsonl", eval_fraction=0.5, validation_fraction=0.5)
    DataConfig(train="t.jsonl", eval_fraction=0.5, validation_fraction=0.5, validation="v.jsonl")
    DataConfig(train="t.jsonl", eval_fraction=0.5, validation_fraction=0.5, eval="e.jsonl")


def test_fingerprint_changes_with_bytes_and_config(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "t.jsonl", _pairs(5))
    cfg = DataConfig(train=path)
    before = load_dataset(cfg, tmp_path / "o").fingerprint
    assert load_dataset(cfg, tmp_path / "o").fingerprint == before
    assert fingerprint_files([path], "x") != fingerprint_files([path], "y")
    path.write_bytes(path.read_bytes().replace(b"question 4", b"question 5"))
    assert load_dataset(cfg, tmp_path / "o").fingerprint != before


def test_preference_formats_trl_and_llama_factory(tmp_path: Path) -> None:
    """TRL's paired and unpaired rows, LLaMA-Factory's kto_tag and ranking datasets become preference examples;
    a bad label names its line and field."""
    trl = tmp_path / "trl.jsonl"
    trl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
                {
                    "prompt": [{"role": "user", "content": "Q2"}],
                    "completion": [{"role": "assistant", "content": "meh"}],
                    "label": False,
                },
                {"prompt": "Q3", "completion": "fine", "label": "true"},
                {"prompt": "Q4", "completion": "fine", "label": "maybe"},
                {"prompt": "Q5", "completion": "plain"},
            ]
        )
        + "\n"
    )
    read = read_file(DataSource(path=trl), Normaliser(None, system_prompt="S"))
    kinds = [(e.messages[-2].content, e.answer, e.kind, e.rejected) for e in read.examples]
    assert kinds == [
        ("Q1", "good", "pair", "bad"),
        ("Q2", "meh", "undesirable", None),
        ("Q3", "fine", "desirable", None),
        ("Q5", "plain", "sft", None),
    ]
    assert read.examples[0].messages[0].content == "S"
    (bad,) = read.rejections
    assert (bad.line, bad.field) == (4, "label") and "must be true (desirable) or false" in bad.reason
    # A preference id differs from the SFT id of the same conversation: both may be in one data set.
    assert read.examples[2].id != example_id(read.examples[2].messages)

    folder = tmp_path / "lf"
    folder.mkdir()
    (folder / "kto.json").write_text(json.dumps([{"instruction": "Q", "output": "A", "kto_tag": False}]))
    (folder / "dpo.json").write_text(
        json.dumps(
            [
                {
                    "conversations": [{"from": "human", "value": "Q"}],
                    "chosen": {"from": "gpt", "value": "yes"},
                    "rejected": {"from": "gpt", "value": "no"},
                }
            ]
        )
    )
    (folder / "dataset_info.json").write_text(
        json.dumps(
            {
                "kto": {"file_name": "kto.json", "columns": {"kto_tag": "kto_tag"}},
                "dpo": {
                    "file_name": "dpo.json",
                    "formatting": "sharegpt",
                    "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
                },
            }
        )
    )
    loaded = load_dataset(DataConfig(train=folder, eval_fraction=0.5), tmp_path / "out")
    examples = [*read_examples(loaded.train_path), *read_examples(loaded.eval_path)]
    assert sorted((e.kind, e.answer, e.rejected) for e in examples) == [
        ("pair", "yes", "no"),
        ("undesirable", "A", None),
    ]
