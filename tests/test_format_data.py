"""Chat-template formatting with assistant-only labels, on the real tiny Qwen3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.tasks.chat.examples import Example, Message, write_jsonl
from tunepipe.tasks.data.check import check_dataset
from tunepipe.tasks.data.format import IGNORE, format_dataset, tokenize_conversation
from tunepipe.tasks.data.load import load_dataset
from tunepipe.tasks.data.results import CheckedData, FormattedData
from tunepipe.tasks.demo.tiny_model import CHATML_TEMPLATE
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.base_model import BaseModelRef, load_tokenizer
from tunepipe.tasks.runtime.config import DataConfig, ModelConfig

END_OF_TURN = "<|im_end|>\n"
# ChatML preceded by the number of messages: a prefix of a conversation renders a different first line.
COUNTING_TEMPLATE = "{{- messages | length }}\n" + CHATML_TEMPLATE


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> BaseModelRef:
    return resolve_base_model(ModelConfig(base=str(tiny_model)))


@pytest.fixture(scope="module")
def tokenizer(base: BaseModelRef):
    return load_tokenizer(base)


def _example(*turns: tuple[str, str], line: int = 1, source: str = "chats.jsonl") -> Example:
    messages = [Message(role=role, content=content) for role, content in turns]
    return Example(id=f"{source}-{line}", messages=messages, source=source, line=line)


def _trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of labels that carry the loss."""
    spans: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_only_the_assistant_answer_and_its_end_of_turn_are_trained(tokenizer) -> None:
    answer = '{"name": "Mini Kettle", "price": "$12"}'
    example = _example(("system", "Extract JSON."), ("user", "<p>Mini Kettle, $12</p>"), ("assistant", answer))
    input_ids, labels = tokenize_conversation(tokenizer, example)

    assert len(labels) == len(input_ids)
    ((start, end),) = _trained_spans(labels)
    assert labels[start:end] == input_ids[start:end]
    assert tokenizer.decode(input_ids[start:end]) == answer + END_OF_TURN
    assert end == len(input_ids)
    # Everything before it (system, user, and the assistant header) is masked.
    assert tokenizer.decode(input_ids[:start]) == (
        "<|im_start|>system\nExtract JSON.<|im_end|>\n"
        "<|im_start|>user\n<p>Mini Kettle, $12</p><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert set(labels[:start]) == {IGNORE}


def test_an_answer_starting_with_a_newline_keeps_a_clean_cut_after_the_header(tokenizer) -> None:
    # Tokenized as one text, the header's "\n" and the answer's "\n" merge into a single "\n\n" token.
    answer = "\n\n{}"
    example = _example(("user", "Return an empty object."), ("assistant", answer))
    input_ids, labels = tokenize_conversation(tokenizer, example)

    ((start, end),) = _trained_spans(labels)
    prompt = "<|im_start|>user\nReturn an empty object.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(input_ids[:start]) == prompt
    assert tokenizer.decode(input_ids[start:end]) == answer + END_OF_TURN


def test_without_assistant_only_loss_every_token_is_trained(tokenizer) -> None:
    example = _example(("system", "Extract JSON."), ("user", "<p>Lamp</p>"), ("assistant", '{"name": "Lamp"}'))
    input_ids, labels = tokenize_conversation(tokenizer, example, assistant_only=False)
    assert labels == input_ids
    assert (input_ids, labels) != tokenize_conversation(tokenizer, example)


def test_eval_split_scores_answers_only_even_when_training_on_everything(
    demo_data: tuple[Path, Path], base: BaseModelRef, tmp_path: Path
) -> None:
    train, eval_ = demo_data
    loaded = load_dataset(DataConfig(train=train, eval=eval_), tmp_path / "loaded")
    formatted = format_dataset(
        loaded.train_path,
        loaded.eval_path,
        base,
        ModelConfig(base=base.name_or_path),
        tmp_path / "formatted",
        assistant_only_loss=False,
    )
    assert formatted.train.n_trained_tokens == formatted.train.n_tokens
    assert formatted.eval.n_trained_tokens < formatted.eval.n_tokens


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer) -> None:
    answers = ["Paris.", "About 2.1 million people."]
    example = _example(
        ("user", "Capital of France?"),
        ("assistant", answers[0]),
        ("user", "And its population?"),
        ("assistant", answers[1]),
    )
    input_ids, labels = tokenize_conversation(tokenizer, example)

    spans = _trained_spans(labels)
    assert [tokenizer.decode(input_ids[start:end]) for start, end in spans] == [a + END_OF_TURN for a in answers]
    for start, end in spans:
        assert labels[start:end] == input_ids[start:end]
    between = tokenizer.decode(input_ids[spans[0][1] : spans[1][0]])
    assert between == "<|im_start|>user\nAnd its population?<|im_end|>\n<|im_start|>assistant\n"


def test_format_dataset_on_the_demo_data(demo_data: tuple[Path, Path], base: BaseModelRef, tmp_path: Path) -> None:
    train_raw, eval_raw = demo_data
    loaded = load_dataset(DataConfig(train=train_raw, eval=eval_raw, system_prompt="Extract."), tmp_path / "loaded")
    formatted = format_dataset(
        loaded.train_path,
        loaded.eval_path,
        base,
        ModelConfig(base=base.name_or_path, max_seq_length=256),
        tmp_path / "formatted",
    )

    assert isinstance(formatted, FormattedData)
    assert (formatted.n_quarantined, formatted.quarantine_path.read_text()) == (0, "")
    for split, n_examples in ((formatted.train, loaded.n_train), (formatted.eval, loaded.n_eval)):
        rows = _rows(split.path)
        assert split.n_rows == len(rows) == n_examples
        assert split.n_tokens == sum(len(row["input_ids"]) for row in rows)
        assert split.max_tokens == max(len(row["input_ids"]) for row in rows) <= 256
        assert split.n_trained_tokens == sum(label != IGNORE for row in rows for label in row["labels"])
        assert 0 < split.n_trained_tokens < split.n_tokens
        assert all(len(row["labels"]) == len(row["input_ids"]) for row in rows)
    # data.validation_fraction of the 400 training pages is held out as validation; the test split is the file.
    assert loaded.n_validation > 0
    assert (formatted.train.n_rows + loaded.n_validation, formatted.eval.n_rows) == (400, 48)


@pytest.fixture(scope="module")
def checked(demo_data: tuple[Path, Path], base: BaseModelRef, tmp_path_factory: pytest.TempPathFactory) -> CheckedData:
    root = tmp_path_factory.mktemp("checked")
    cfg = DataConfig(train=demo_data[0], eval=demo_data[1], system_prompt="Extract.")
    return check_dataset(
        load_dataset(cfg, root / "loaded"), cfg, base, ModelConfig(base=base.name_or_path), root / "checked"
    )


def _formatted_rows(formatted: FormattedData) -> tuple[list[dict], list[dict]]:
    return _rows(formatted.train.path), _rows(formatted.eval.path)


def test_the_data_checks_token_ids_format_as_tokenizing_again(
    checked: CheckedData, base: BaseModelRef, tmp_path: Path
) -> None:
    cfg = ModelConfig(base=base.name_or_path)
    for assistant_only_loss in (True, False):
        args = (checked.train.clean_path, checked.eval.clean_path, base, cfg)
        from_check = format_dataset(*args, tmp_path / "a", assistant_only_loss, tokens=checked.tokens)
        again = format_dataset(*args, tmp_path / "b", assistant_only_loss)
        assert _formatted_rows(from_check) == _formatted_rows(again)
        for split in ("train", "eval"):
            counts = getattr(from_check, split).model_dump(exclude={"path"})
            assert counts == getattr(again, split).model_dump(exclude={"path"})
            assert counts["n_rows"] == getattr(checked, split).n_passed


def test_token_ids_of_another_chat_template_are_not_used(
    checked: CheckedData, base: BaseModelRef, tmp_path: Path
) -> None:
    cfg = ModelConfig(base=base.name_or_path, chat_template="[chat]" + CHATML_TEMPLATE)
    args = (checked.train.clean_path, checked.eval.clean_path, base, cfg)
    formatted = format_dataset(*args, tmp_path / "a", tokens=checked.tokens)
    tokenizer = load_tokenizer(base, cfg.chat_template)
    assert all(
        tokenizer.decode(row["input_ids"]).startswith("[chat]<|im_start|>") for row in _rows(formatted.train.path)
    )
    assert _formatted_rows(formatted) == _formatted_rows(format_dataset(*args, tmp_path / "b"))


def test_token_ids_of_other_examples_are_refused(checked: CheckedData, base: BaseModelRef, tmp_path: Path) -> None:
    swapped = checked.tokens.model_copy(update={"train": checked.tokens.eval, "eval": checked.tokens.train})
    with pytest.raises(RuntimeError, match="does not hold the token ids of the examples"):
        format_dataset(
            checked.train.clean_path,
            checked.eval.clean_path,
            base,
            ModelConfig(base=base.name_or_path),
            tmp_path / "out",
            tokens=swapped,
        )


def test_too_long_examples_are_quarantined_not_truncated(base: BaseModelRef, tmp_path: Path) -> None:
    short = _example(("user", "hi"), ("assistant", "hello"), line=1, source="train.jsonl")
    long = _example(("user", "word " * 200), ("assistant", "ok"), line=2, source="train.jsonl")
    fine_eval = _example(("user", "hey"), ("assistant", "hi"), line=1, source="eval.jsonl")
    write_jsonl(tmp_path / "train.jsonl", [short, long])
    write_jsonl(tmp_path / "eval.jsonl", [fine_eval])

    cfg = ModelConfig(base=base.name_or_path, max_seq_length=64)
    formatted = format_dataset(tmp_path / "train.jsonl", tmp_path / "eval.jsonl", base, cfg, tmp_path / "out")

    assert formatted.n_quarantined == 1
    (rejected,) = _rows(formatted.quarantine_path)
    assert (rejected["source"], rejected["line"], rejected["field"]) == ("train.jsonl", 2, "messages")
    assert rejected["reason"].endswith("tokens > max_seq_length 64")
    assert int(rejected["reason"].split()[0]) > 64
    assert Example.model_validate_json(rejected["raw"]) == long
    assert [row["id"] for row in _rows(formatted.train.path)] == [short.id]
    assert formatted.train.n_rows == 1 and formatted.eval.n_rows == 1


def test_a_split_with_nothing_that_fits_fails(base: BaseModelRef, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [_example(("user", "hi"), ("assistant", "hello"))])
    write_jsonl(tmp_path / "eval.jsonl", [_example(("user", "word " * 200), ("assistant", "ok"))])
    cfg = ModelConfig(base=base.name_or_path, max_seq_length=64)
    with pytest.raises(ValueError, match=r"no eval example fits model\.max_seq_length=64"):
        format_dataset(tmp_path / "train.jsonl", tmp_path / "eval.jsonl", base, cfg, tmp_path / "out")


def test_a_template_that_does_not_render_incrementally_is_refused(base: BaseModelRef, tmp_path: Path) -> None:
    conversation = [("user", "hi"), ("assistant", "hello")]
    write_jsonl(tmp_path / "train.jsonl", [_example(*conversation, line=7, source="data/train.jsonl")])
    write_jsonl(tmp_path / "eval.jsonl", [_example(*conversation, source="data/eval.jsonl")])
    cfg = ModelConfig(base=base.name_or_path, chat_template=COUNTING_TEMPLATE)
    with pytest.raises(ValueError, match=r"^data/train\.jsonl:7: the chat template renders") as excinfo:
        format_dataset(tmp_path / "train.jsonl", tmp_path / "eval.jsonl", base, cfg, tmp_path / "out")
    assert "model.chat_template" in str(excinfo.value)


def test_the_configured_chat_template_is_used(base: BaseModelRef) -> None:
    template = (
        "{% for m in messages %}[{{ m.role }}]\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    tokenizer = load_tokenizer(base, template)
    input_ids, labels = tokenize_conversation(tokenizer, _example(("user", "hi"), ("assistant", "hello")))
    assert tokenizer.decode(input_ids) == "[user]\nhi\n[assistant]\nhello\n"
    ((start, end),) = _trained_spans(labels)
    assert tokenizer.decode(input_ids[start:end]) == "hello\n"
