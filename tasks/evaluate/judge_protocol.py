"""What the judge is asked and how its replies are read (`tunepipe.tasks.evaluate.judge` puts the questions to it).

Pairwise, MT-Bench's protocol: the question as the models saw it, the reference answer and two answers, asked in
both orders; an example's result comes from its two verdicts. Rubric, G-Eval style: one answer scored 1-5 against
the reference. A verdict is read from an "[[A]]"-style mark, a JSON object (the reply format a judge that keeps to
a schema is asked for) or a bare answer; a reply without one is asked again once, with the format restated.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Message

PAIRWISE_SYSTEM = (
    "You are an impartial judge of the answers two AI assistants gave to the same question. You are also given a "
    "reference answer written by an expert. Judge each answer by whether it says what the reference says, "
    "correctly and completely, using only what the question and its context support: other wording is not a "
    "mistake, a wrong or invented fact is. Do not let the order of the answers, their length or their style "
    "sway you."
)
PAIRWISE_FREE = (
    'Compare the two answers briefly, then give your verdict on a last line of its own: "[[A]]" if '
    'assistant A\'s answer is better, "[[B]]" if assistant B\'s answer is better, "[[C]]" for a tie.'
)
PAIRWISE_JSON = (
    'Reply with a JSON object: {"verdict": "A"} if assistant A\'s answer is better, {"verdict": "B"} '
    'if assistant B\'s answer is better, {"verdict": "C"} for a tie.'
)
PAIRWISE_RESTATED = 'I cannot read a verdict in your reply. Reply with the verdict only: "[[A]]", "[[B]]" or "[[C]]".'
RUBRIC_SYSTEM = (
    "You are an impartial judge of an answer an AI assistant gave to a question. You are also given a reference "
    "answer written by an expert. Score the answer by the rubric below; other wording than the reference's is "
    "not a mistake, a wrong or invented fact is."
)
RUBRIC_FREE = 'Explain your score briefly, then give it on a last line of its own as "[[1]]" to "[[5]]".'
RUBRIC_JSON = 'Reply with a JSON object {"score": N}, N from 1 to 5.'
RUBRIC_RESTATED = 'I cannot read a score in your reply. Reply with the score only: "[[1]]" to "[[5]]".'
SCHEMAS = {
    "pairwise": {
        "type": "object",
        "properties": {"verdict": {"type": "string", "enum": ["A", "B", "C"]}},
        "required": ["verdict"],
    },
    "rubric": {
        "type": "object",
        "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
        "required": ["score"],
    },
}
BRACKETED = {
    "pairwise": re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE),
    "rubric": re.compile(r"\[\[\s*([1-5])\s*\]\]"),
}
BARE = {
    "pairwise": re.compile(r"\W*(?:assistant\s+)?([ABC])\W*", re.IGNORECASE),
    "rubric": re.compile(r"\W*([1-5])\W*"),
}
# Per example and order, the candidate's result: a verdict naming the candidate's position is a win.
OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}


class Judgment(BaseModel):
    """One question put to the judge and what came back: what is cached and shown."""

    messages: list[dict[str, str]]
    replies: list[str]  # the reply; then the reply to the restated format, when the first had no verdict
    verdict: str | None  # "A" / "B" / "C" (pairwise) or "1".."5" (rubric); None: none could be read
    seconds: float  # asking, in all


def parse_verdict(reply: str, mode: str) -> str | None:
    """The verdict in a judge's reply: the last "[[A]]"-style mark (or "[[4]]"), a JSON object's `verdict`
    (`score`), or a reply that is the bare verdict; None when there is none."""
    text = reply.strip()
    with contextlib.suppress(ValueError):
        value = json.loads(text[text.index("{") : text.rindex("}") + 1])
        found = str(value.get("verdict" if mode == "pairwise" else "score", "")) if isinstance(value, dict) else ""
        if (bare := BARE[mode].fullmatch(found)) is not None:
            return bare[1].upper()
    if marks := BRACKETED[mode].findall(text):
        return marks[-1].upper()
    bare = BARE[mode].fullmatch(text)
    return bare[1].upper() if bare else None


def pairwise_result(candidate_first: str | None, candidate_second: str | None) -> tuple[str, float]:
    """(result, candidate's value) of one example from its two verdicts: the candidate as answer A, then as B.
    Agreeing orders give win / tie / loss; orders that disagree give `flip` (a tie), an unread verdict `unread`
    (a tie)."""
    if candidate_first is None or candidate_second is None:
        return "unread", OUTCOME["tie"]
    first = {"A": "win", "B": "loss", "C": "tie"}[candidate_first]
    second = {"B": "win", "A": "loss", "C": "tie"}[candidate_second]
    return (first, OUTCOME[first]) if first == second else ("flip", OUTCOME["tie"])


def question_text(prompt: list[Message]) -> str:
    """The conversation as the models saw it: the system prompt (where RAG context may be), earlier turns, the
    question (with its context when the context is in the user turn)."""
    parts = []
    for i, message in enumerate(prompt):
        title = (
            "Question"
            if i == len(prompt) - 1
            else {"system": "System prompt", "user": "User", "assistant": "Assistant"}.get(message.role, message.role)
        )
        parts.append(f"[{title}]\n{message.content}")
    return "\n\n".join(parts)


def pairwise_messages(
    question: str, reference: str, answer_a: str, answer_b: str, structured: bool
) -> list[dict[str, str]]:
    user = (
        f"{question}\n\n[Reference answer]\n{reference}\n[End of reference answer]\n\n"
        f"[Assistant A's answer]\n{answer_a}\n[End of assistant A's answer]\n\n"
        f"[Assistant B's answer]\n{answer_b}\n[End of assistant B's answer]\n\n"
        + (PAIRWISE_JSON if structured else PAIRWISE_FREE)
    )
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def rubric_messages(question: str, reference: str, answer: str, rubric: str, structured: bool) -> list[dict[str, str]]:
    user = (
        f"[Rubric]\n{rubric}\n\n{question}\n\n[Reference answer]\n{reference}\n[End of reference answer]\n\n"
        f"[The assistant's answer]\n{answer}\n[End of the assistant's answer]\n\n"
        + (RUBRIC_JSON if structured else RUBRIC_FREE)
    )
    return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]


Ask = Callable[[list[dict[str, str]], dict[str, Any] | None], str]


def ask_judge(ask: Ask, messages: list[dict[str, str]], mode: str, structured: bool) -> Judgment:
    """Ask once; when no verdict can be read, once more with the format restated (in the same conversation)."""
    started = time.perf_counter()
    schema = SCHEMAS[mode] if structured else None
    replies = [ask(messages, schema)]
    verdict = parse_verdict(replies[0], mode)
    if verdict is None:
        restated = PAIRWISE_RESTATED if mode == "pairwise" else RUBRIC_RESTATED
        replies.append(
            ask(
                [*messages, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": restated}], schema
            )
        )
        verdict = parse_verdict(replies[1], mode)
    return Judgment(messages=messages, replies=replies, verdict=verdict, seconds=time.perf_counter() - started)
