import json
import sqlite3
from pathlib import Path

import pytest

from tunepipe.tasks.demo.data import DEMO_ROWS, write_demo_dataset, write_demo_rag_log


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_bytes_every_call(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a")
    second = write_demo_dataset(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other_seed = write_demo_dataset(tmp_path / "c", seed=1)
    assert other_seed[0].read_bytes() != first[0].read_bytes()


def test_rows_have_the_seed_shape_and_the_answer_is_in_the_input(tmp_path: Path) -> None:
    train_path, eval_path = write_demo_dataset(tmp_path, n_train=400, n_eval=48)
    train, eval_ = _rows(train_path), _rows(eval_path)
    assert (len(train), len(eval_)) == (400, 48)
    for row in train + eval_:
        assert set(row) == {"input", "output"}
        assert list(row["output"]) == ["name", "price", "category", "manufacturer"]
        for key, value in row["output"].items():
            assert f'itemprop="{key}">{value}</' in row["input"]
        assert 150 <= len(row["input"]) <= 400
    for label in ("Brand", "Manufacturer", "Made by"):  # layouts vary, so the model has to read
        assert any(label in row["input"] for row in train)
    assert {row["input"][:5] for row in train} == {"<div ", "<tabl", "<sect", "<ul i"}
    assert len({row["input"].index(row["output"]["price"]) for row in train}) > 10


def test_each_value_is_the_same_tokens_on_the_page_as_in_the_answer(tmp_path: Path, tiny_model: Path) -> None:
    """So the model can copy a value token by token (after `Brand: ` it would start with another token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def contains(ids: list[int], part: list[int]) -> bool:
        return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))

    train_path, _ = write_demo_dataset(tmp_path, n_train=200, n_eval=8)
    for row in _rows(train_path):
        page = tokenizer(row["input"])["input_ids"]
        answer = tokenizer(json.dumps(row["output"], separators=(",", ":")))["input_ids"]  # as the loader writes it
        for key, value in row["output"].items():
            # The page's `">$` is one token; the digits that follow are the answer's.
            tokens = tokenizer(value.removeprefix("$") if key == "price" else value)["input_ids"]
            assert contains(page, tokens) and contains(answer, tokens), (key, value)


def test_eval_products_are_disjoint_from_train(tmp_path: Path) -> None:
    train_path, eval_path = write_demo_dataset(tmp_path)
    train, eval_ = _rows(train_path), _rows(eval_path)
    assert len({(row["output"]["name"], row["output"]["manufacturer"]) for row in train}) == 400  # all distinct
    eval_names = {row["output"]["name"] for row in eval_}
    assert len(eval_names) == 48
    assert not {row["output"]["name"] for row in train} & eval_names


def test_the_demo_data_set_has_more_manufacturers_than_a_model_could_guess(tmp_path: Path) -> None:
    train_path, eval_path = write_demo_dataset(tmp_path, *DEMO_ROWS)
    train = _rows(train_path)
    assert len(train) == DEMO_ROWS[0] >= 2000
    assert len({row["output"]["manufacturer"] for row in train}) >= 50
    assert len({row["output"]["price"] for row in train}) > len(train) / 2


def test_the_rag_log_holds_products_outside_the_demo_data_set(tmp_path: Path) -> None:
    train_path, eval_path = write_demo_dataset(tmp_path / "data", *DEMO_ROWS)
    products = {(row["output"]["name"], row["output"]["manufacturer"]) for row in _rows(train_path) + _rows(eval_path)}
    db = write_demo_rag_log(tmp_path / "rag.db", n=50)
    write_demo_rag_log(db, n=50)  # another day
    with sqlite3.connect(db) as connection:
        logged = list(connection.execute("select question, answer, rating from rag_examples"))
    assert len(logged) == 100
    answers = [json.loads(answer) for _, answer, rating in logged if rating != 2]
    assert not {(a["name"], a["manufacturer"]) for a in answers} & products
    # Rated 2: realistic bad answers (wrong fields, the page echoed back, rambling); some pages were asked again
    # and answered right, so the log holds questions with a good and a bad answer.
    bad = [(question, answer) for question, answer, rating in logged if rating == 2]
    assert len(bad) >= 10
    assert any(answer == question for question, answer in bad)
    assert any(answer.startswith("Sure!") for _, answer in bad)
    assert any(answer.startswith("{") and len(json.loads(answer)) == 3 for _, answer in bad)
    good_questions = {question for question, _, rating in logged if rating == 5}
    assert sum(question in good_questions for question, _ in bad) >= 3


def test_too_many_rows_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct products"):
        write_demo_dataset(tmp_path, n_train=200_000)
    with pytest.raises(ValueError, match="product names"):
        write_demo_dataset(tmp_path, n_eval=5_000)
