import json
from pathlib import Path

import pytest

from tasks.demo_data import write_demo_dataset


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
        for value in row["output"].values():
            assert value in row["input"]
        assert 100 <= len(row["input"]) <= 250
    for label in ("Brand:", "Manufacturer:", "Made by:"):  # layouts vary, so the model has to read
        assert any(label in row["input"] for row in train)
    assert len({row["input"].index(row["output"]["price"]) for row in train}) > 10


def test_eval_products_are_disjoint_from_train(tmp_path: Path) -> None:
    train_path, eval_path = write_demo_dataset(tmp_path)
    train_names = {row["output"]["name"] for row in _rows(train_path)}
    eval_names = {row["output"]["name"] for row in _rows(eval_path)}
    assert len(train_names) == 400  # every product distinct, not just the split
    assert len(eval_names) == 48
    assert not train_names & eval_names


def test_too_many_rows_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct products"):
        write_demo_dataset(tmp_path, n_train=10_000)
