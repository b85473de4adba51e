"""Task metrics for generated answers: one scorer for every place that judges answers.

The evaluation stage (PyTorch), the GGUF parity check (llama.cpp) and the Ollama smoke test all score
answers here, so a number means the same wherever it was measured.

JSON tasks: valid-JSON rate, exact match (parsed objects equal), per-field accuracy (expected fields whose
value is reproduced exactly, also per field name), key precision / recall / F1 (keys the answer has against
keys the reference has) and the share of answers carrying every required key. Free text: exact match
(after trimming), ROUGE-L (Google's `rouge-score`) and chrF (`sacrebleu`), both computed locally.
For all: stop rate, the share of answers that ended by an end-of-turn token and not at the length limit.

Each example gets its own scores (for the per-example table and the worst-examples report); a split's
score is the mean over examples of each metric the example has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Literal

from tunepipe.tasks.chat.examples import split_reasoning
from tunepipe.tasks.runtime.config import LOWER_IS_BETTER

OutputFormat = Literal["json", "text"]


def parse_json_object(text: str) -> dict | None:
    """The answer as a JSON object, or None when it is not one (arrays and scalars are not answers)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def required_keys(reference_answers: Iterable[str]) -> list[str]:
    """Keys present in every JSON reference answer: the ones a valid answer must carry."""
    common: set[str] | None = None
    order: list[str] = []
    for answer in reference_answers:
        parsed = parse_json_object(split_reasoning(answer)[1])
        if parsed is None:
            continue
        order = order or list(parsed)
        common = set(parsed) if common is None else common & set(parsed)
    return [key for key in order if key in (common or set())]


def improvement(metric: str, candidate: float, other: float) -> float:
    """How much better the candidate is than `other` on `metric` (negative: worse)."""
    return other - candidate if metric in LOWER_IS_BETTER else candidate - other


def score_example(
    answer: str, reference: str, stopped: bool, output_format: OutputFormat, required: Sequence[str] = ()
) -> dict[str, float]:
    """Every metric of one answer against its reference, each in [0, 1].

    Both are judged after a leading `<think>` block (data.reasoning keep/wrap train the model to write one).
    """
    answer, reference = split_reasoning(answer)[1], split_reasoning(reference)[1]
    scores = {"stop_rate": float(stopped)}
    if output_format == "json":
        scores.update(_json_scores(answer, reference, required))
    else:
        scores.update(_text_scores(answer, reference))
    return scores


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the examples that have it (per-field accuracies exist only where expected)."""
    totals: dict[str, list[float]] = {}
    for scores in per_example:
        for name, value in scores.items():
            totals.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in sorted(totals.items())}


def score_answers(
    answers: Sequence[str],
    references: Sequence[str],
    stopped: Sequence[bool],
    output_format: OutputFormat,
    required: Sequence[str] = (),
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(split scores, per-example scores) for answers aligned with their references."""
    if not len(answers) == len(references) == len(stopped):
        raise ValueError(f"{len(answers)} answers, {len(references)} references, {len(stopped)} stop flags")
    per_example = [score_example(a, r, s, output_format, required) for a, r, s in zip(answers, references, stopped)]
    return aggregate(per_example), per_example


def _json_scores(answer: str, reference: str, required: Sequence[str]) -> dict[str, float]:
    parsed, expected = parse_json_object(answer), parse_json_object(reference)
    if expected is None:
        raise ValueError(f"reference answer is not a JSON object: {reference[:200]!r}")
    got = parsed or {}
    matched = [key for key in expected if key in got and got[key] == expected[key]]
    shared_keys = len(set(got) & set(expected))
    precision = shared_keys / len(got) if got else 0.0
    recall = shared_keys / len(expected) if expected else 1.0
    scores = {
        "valid_json_rate": float(parsed is not None),
        "exact_match": float(parsed == expected),
        "field_accuracy": len(matched) / len(expected) if expected else float(parsed == expected),
        "key_precision": precision,
        "key_recall": recall,
        "key_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "required_keys_rate": float(parsed is not None and all(key in parsed for key in required)),
    }
    scores.update({f"field_accuracy.{key}": float(key in matched) for key in expected})
    return scores


def _text_scores(answer: str, reference: str) -> dict[str, float]:
    from sacrebleu.metrics import CHRF

    rouge = _rouge_scorer().score(reference, answer)["rougeL"].fmeasure
    chrf = CHRF().sentence_score(answer, [reference]).score / 100
    return {"exact_match": float(answer.strip() == reference.strip()), "rouge_l": rouge, "chrf": chrf}


@cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=False)


# "Close to a rated-bad answer": the same JSON object, or text this similar (difflib's ratio on
# whitespace-normalised text: 0.9 lets a changed price or a few words through, not another answer).
CLOSE_RATIO = 0.9


def close_to(answer: str, bad: str) -> bool:
    """Whether `answer` repeats the rated-bad answer `bad`: equal as JSON objects, or nearly equal as text."""
    from difflib import SequenceMatcher

    from tunepipe.tasks.chat.examples import split_reasoning

    answer, bad = split_reasoning(answer)[1], split_reasoning(bad)[1]
    parsed, expected = parse_json_object(answer), parse_json_object(bad)
    if parsed is not None and expected is not None:
        return parsed == expected
    return SequenceMatcher(None, " ".join(answer.split()), " ".join(bad.split()), autojunk=False).ratio() >= CLOSE_RATIO
