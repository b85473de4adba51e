"""The data check runs the real Great Expectations suite on small files of canonical examples."""

import json
from pathlib import Path

import pytest

from data_checks.chat_suite import DataCheckError, check_examples
from tasks.config import DataConfig
from tasks.examples import Example, Message, read_examples, write_jsonl
from tasks.load_data import Rejection, example_id

SOURCE = "user/train.jsonl"


def _example(line: int, answer: str | None = None, question: str | None = None, roles: tuple[str, ...] = ()) -> Example:
    question = question or f"<p>Product {line}</p>"
    answer = answer if answer is not None else json.dumps({"name": f"Product {line}"})
    roles = roles or ("system", "user", "assistant")
    contents = {"system": "Extract JSON.", "user": question, "assistant": answer}
    messages = [Message(role=role, content=contents[role]) for role in roles]
    return Example(id=example_id(messages), messages=messages, source=SOURCE, line=line)


def _write(tmp_path: Path, examples: list[Example]) -> Path:
    path = tmp_path / "in" / "train.jsonl"
    write_jsonl(path, examples)
    return path


def _quarantine(path: Path) -> list[Rejection]:
    return [Rejection.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cfg(**overrides: object) -> DataConfig:
    return DataConfig(train=Path(SOURCE), **{"min_rows": 5, **overrides})


def test_clean_set_passes(tmp_path: Path) -> None:
    examples = [_example(line) for line in range(1, 11)]
    report = check_examples(_write(tmp_path, examples), _cfg(), tmp_path / "out")

    assert report.success
    assert (report.n_checked, report.n_passed, report.n_quarantined) == (10, 10, 0)
    assert all(e["success"] for e in report.expectations)
    assert {e["name"] for e in report.expectations} >= {
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_json_parseable",
        "expect_column_values_to_match_regex",
    }
    assert list(read_examples(report.clean_path)) == examples
    assert report.quarantine_path.read_text() == ""


def test_bad_rows_are_quarantined_with_their_lines(tmp_path: Path) -> None:
    good = [_example(line) for line in range(1, 11)]
    duplicate = good[2].model_copy(update={"line": 11})
    not_json = _example(12, answer="Laptop, $999")
    array = _example(13, answer='["Laptop"]')
    too_long = _example(14, question="x" * 600)
    bad_roles = _example(15, roles=("user", "user", "assistant"))
    examples = [*good, duplicate, not_json, array, too_long, bad_roles]
    report = check_examples(_write(tmp_path, examples), _cfg(max_chars=500), tmp_path / "out")

    assert not report.success
    assert (report.n_checked, report.n_passed, report.n_quarantined) == (15, 10, 5)
    quarantined = {r.line: r for r in _quarantine(report.quarantine_path)}
    assert sorted(quarantined) == [11, 12, 13, 14, 15]  # the first copy of the duplicate (line 3) stays
    assert quarantined[11].field == "id" and "duplicate of line 3" in quarantined[11].reason
    assert quarantined[12].field == "answer" and "json_parseable" in quarantined[12].reason
    assert quarantined[13].field == "answer" and "JSON object" in quarantined[13].reason
    assert quarantined[14].field == "chars" and "500" in quarantined[14].reason
    assert quarantined[15].field == "roles" and "user,user,assistant" in quarantined[15].reason
    assert all(r.source == SOURCE for r in quarantined.values())
    assert Example.model_validate_json(quarantined[12].raw) == not_json  # nothing lost
    assert [e.line for e in read_examples(report.clean_path)] == list(range(1, 11))

    failed = {(e["name"], e["column"]): e for e in report.expectations if not e["success"]}
    assert failed[("expect_column_values_to_be_json_parseable", "answer")]["unexpected_examples"] == ["Laptop, $999"]
    assert failed[("expect_column_values_to_be_between", "chars")]["unexpected_count"] == 1


def test_text_output_format_accepts_plain_answers(tmp_path: Path) -> None:
    examples = [_example(line, answer=f"plain answer {line}") for line in range(1, 6)]
    report = check_examples(_write(tmp_path, examples), _cfg(output_format="text"), tmp_path / "out")
    assert report.success and report.n_passed == 5
    assert "expect_column_values_to_be_json_parseable" not in {e["name"] for e in report.expectations}


def test_report_files(tmp_path: Path) -> None:
    examples = [_example(line) for line in range(1, 7)] + [_example(7, answer="<script>alert(1)</script>")]
    report = check_examples(_write(tmp_path, examples), _cfg(), tmp_path / "out", split="eval")

    assert report.report_json == tmp_path / "out" / "eval_report.json"
    saved = json.loads(report.report_json.read_text())
    assert saved["summary"]["n_quarantined"] == 1
    assert saved["great_expectations"]["success"] is False
    assert len(saved["great_expectations"]["results"]) == len(report.expectations)

    page = report.report_html.read_text()
    for expectation in report.expectations:
        assert expectation["name"] in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert str(report.quarantine_path) in page


def test_too_few_clean_rows_raise_naming_the_quarantine(tmp_path: Path) -> None:
    examples = [_example(1), _example(2, answer="not json"), _example(3, answer="nope")]
    path = _write(tmp_path, examples)
    with pytest.raises(DataCheckError) as caught:
        check_examples(path, _cfg(min_rows=2), tmp_path / "out")

    message = str(caught.value)
    quarantine = tmp_path / "out" / "train_quarantine.jsonl"
    assert str(path) in message and str(quarantine) in message
    assert "only 1 of 3" in message and "expect_column_values_to_be_json_parseable on answer (2 rows)" in message
    assert [r.line for r in _quarantine(quarantine)] == [2, 3]
    assert caught.value.report.n_passed == 1


def test_eval_split_needs_one_clean_row(tmp_path: Path) -> None:
    one = _write(tmp_path, [_example(1)])
    assert check_examples(one, _cfg(min_rows=20), tmp_path / "out", split="eval").n_passed == 1
    with pytest.raises(DataCheckError, match="no rows to check"):
        check_examples(_write(tmp_path, []), _cfg(), tmp_path / "out", split="eval")
