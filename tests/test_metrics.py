"""The task metrics, on answers whose right scores can be worked out by hand."""

from __future__ import annotations

import pytest

from tunepipe.tasks.chat.metrics import aggregate, required_keys, score_answers, score_example

REFERENCE = '{"name": "Mini Kite", "price": "$12", "category": "Toys"}'


def test_exact_json_answer_scores_one_everywhere():
    scores = score_example(
        '{"price":"$12","name":"Mini Kite","category":"Toys"}', REFERENCE, True, "json", ["name", "price"]
    )
    assert scores["exact_match"] == scores["valid_json_rate"] == scores["field_accuracy"] == 1.0
    assert scores["key_f1"] == scores["required_keys_rate"] == scores["stop_rate"] == 1.0
    assert scores["field_accuracy.price"] == 1.0


def test_partial_json_answer():
    # name right, price wrong, category missing, one extra key.
    answer = '{"name": "Mini Kite", "price": "$13", "colour": "red"}'
    scores = score_example(answer, REFERENCE, False, "json", ["name", "category"])
    assert scores["valid_json_rate"] == 1.0 and scores["exact_match"] == 0.0
    assert scores["field_accuracy"] == pytest.approx(1 / 3)
    assert scores["key_precision"] == pytest.approx(2 / 3) and scores["key_recall"] == pytest.approx(2 / 3)
    assert scores["key_f1"] == pytest.approx(2 / 3)
    assert scores["required_keys_rate"] == 0.0 and scores["stop_rate"] == 0.0
    assert (scores["field_accuracy.name"], scores["field_accuracy.price"], scores["field_accuracy.category"]) == (
        1.0,
        0.0,
        0.0,
    )


@pytest.mark.parametrize("answer", ['{"name": "Mini Kite"', "[1, 2]", "Sure! Here it is"])
def test_answer_that_is_not_a_json_object_is_invalid(answer):
    scores = score_example(answer, REFERENCE, True, "json")
    assert scores["valid_json_rate"] == scores["exact_match"] == scores["field_accuracy"] == 0.0
    assert scores["key_f1"] == 0.0


def test_text_metrics():
    same = score_example("the cat sat on the mat", "the cat sat on the mat", True, "text")
    assert same["exact_match"] == same["rouge_l"] == 1.0 and same["chrf"] == pytest.approx(1.0)
    partial = score_example("the cat sat", "the cat sat on the mat", True, "text")
    assert partial["exact_match"] == 0.0
    assert partial["rouge_l"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # LCS 3: precision 3/3, recall 3/6
    assert 0.0 < partial["chrf"] < 1.0


def test_split_scores_are_means_over_examples_that_have_the_metric():
    other = '{"name": "Kite", "price": "$1"}'
    summary, per_example = score_answers([REFERENCE, "nope"], [REFERENCE, other], [True, False], "json")
    assert summary["exact_match"] == 0.5 and summary["stop_rate"] == 0.5
    assert summary["field_accuracy.category"] == 1.0  # only the first reference has a category
    assert per_example[1]["valid_json_rate"] == 0.0
    assert aggregate(per_example) == summary


def test_required_keys_are_those_in_every_reference():
    answers = [REFERENCE, '{"name": "A", "price": "$1", "extra": 1}', "not json"]
    assert required_keys(answers) == ["name", "price"]


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="2 answers, 1 references"):
        score_answers(["a", "b"], ["a"], [True, True], "text")


def test_answers_are_scored_after_a_leading_reasoning_block():
    # data.reasoning keep/wrap train the model to think first; the answer after the block is what is judged.
    reference = "<think>\nThe heading names it.\n</think>\n\n" + REFERENCE
    answer = '<think>Price first.</think>\n{"name": "Mini Kite", "price": "$12", "category": "Toys"}'
    assert score_example(answer, reference, True, "json")["exact_match"] == 1.0
    assert required_keys([reference]) == ["name", "price", "category"]
    # Qwen3.5, QwQ, DeepSeek-R1: the generation prompt opens the block, the model writes from inside it.
    opened = 'Price first.\n</think>\n\n{"name": "Mini Kite", "price": "$12", "category": "Toys"}'
    assert score_example(opened, reference, True, "json")["exact_match"] == 1.0


def test_close_to_a_rated_bad_answer() -> None:
    from tunepipe.tasks.chat.metrics import close_to

    bad = '{"name": "Lamp", "price": "Acme", "manufacturer": "$5"}'
    assert close_to('{"manufacturer":"$5","name":"Lamp","price":"Acme"}', bad)  # the same JSON object
    assert not close_to('{"name": "Lamp", "price": "$5", "manufacturer": "Acme"}', bad)
    page = '<div itemscope><h2 itemprop="name">Lamp</h2><p>Price: <span itemprop="price">$5</span></p></div>'
    assert close_to(page.replace("$5", "$6"), page)  # echoed back, one character off
    assert not close_to('{"name": "Lamp"}', page)
