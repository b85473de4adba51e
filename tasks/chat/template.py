"""How a conversation meets the chat template: the variables it is rendered with, and what an answer trains.

Training texts, evaluation prompts, parity and the served TEMPLATE render with one `ChatContext`, made when
the data check first tokenizes and carried through the run's formatting output, so every stage builds the
same text: `enable_thinking` follows `data.reasoning` (off for `strip`, where a template such as Qwen3's or
SmolLM3's then writes an empty `<think>` block into the generation prompt; on for `keep` and `wrap`), and
templates that print today's date (`strftime_now`: Llama 3.2, Granite 3.3) print the date training used.
Templates that read an answer's reasoning from its `reasoning_content` field rather than its text (DeepSeek
V3.2/V4, Laguna S, Spark) are given it there, when that is what makes the answer train as it is read.
Templates whose every reply starts with the same markup, whatever the answer (gpt-oss's
`<|channel|>final<|message|>`, Solar's `<|content|>`, Command R7B's `<|START_RESPONSE|>`, functionary's
`all\n`), have that reply prefix written by the prompt side: the generation prompt of training, evaluation,
parity and the served TEMPLATE ends with it, so the model writes only the answer and Ollama returns just it.

`answer_piece` is the text an assistant turn trains: what the template writes after the generation prompt.
Templates whose generation prompt opens the reasoning block (QwQ, the DeepSeek-R1 distills) render a
finished answer without its reasoning (DeepSeek V3.1: with the block emptied); the answer is then trained as
the model writes it after that prompt: the rest of its `<think>` block (an empty one when it has none), the
answer, the template's end.
Whatever the template writes, the trained text must split (`split_reasoning`) into the reasoning the answer
kept and the answer that evaluation, parity and the smoke test judge, or the answer is refused.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from itertools import chain
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tunepipe.tasks.chat.examples import split_reasoning

Reasoning = Literal["keep", "strip", "wrap"]
EMPTY_BLOCK = "<think>\n\n</think>\n\n"  # an answer without reasoning after a prompt that opened the block
# The probe conversation that decides how a template is given reasoning; plain words no template alters.
PROBE_USER = [{"role": "user", "content": "USERPROBE"}]
PROBE_ANSWER = "ANSWERPROBE"
PROBE_REASONED = f"<think>\nREASONINGPROBE\n</think>\n\n{PROBE_ANSWER}"

# transformers' rendering of a conversation: messages, add_generation_prompt → text.
ChatRenderer = Callable[[list[dict[str, str]], bool], str]


class ChatContext(BaseModel):
    """The chat template's variables besides the messages, the same in every stage of a run."""

    model_config = ConfigDict(frozen=True)

    reasoning: Reasoning = "keep"  # `data.reasoning`
    date: dt.date | None = None  # what `strftime_now` prints; None: the day of rendering (transformers' own)
    reasoning_field: bool = False  # an answer's `<think>` block goes to its `reasoning_content`, not its text
    reply_prefix: str = ""  # what every reply starts with (found by probing): the generation prompt's last text

    @classmethod
    def for_template(cls, reasoning: Reasoning, chat_template: str, today: dt.date) -> ChatContext:
        """The context of a run under `data.reasoning` starting `today`: the date only where the template
        prints one (a re-run on another day then finds every other template's caches), and the reasoning in
        `reasoning_content` where only that makes an answer train as evaluation reads it, and a reply prefix
        where only that does."""
        inline = cls(reasoning=reasoning, date=today if "strftime_now" in chat_template else None)
        plain = [inline] if reasoning == "strip" else [inline, inline.model_copy(update={"reasoning_field": True})]
        # A reply prefix only where the template needs one (probed lazily): it changes what is trained.
        prefixed = (
            chat.model_copy(update={"reply_prefix": prefix})
            for chat in plain
            if (prefix := _reply_prefix(chat_template, chat))
        )
        return next((chat for chat in chain(plain, prefixed) if _trains_as_read(chat_template, chat)), inline)

    @classmethod
    def today(cls, reasoning: Reasoning, chat_template: str) -> ChatContext:
        return cls.for_template(reasoning, chat_template, dt.datetime.now(dt.UTC).date())

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages as the chat template is given them."""
        if not self.reasoning_field:
            return messages
        given = []
        for message in messages:
            reasoning, answer = split_reasoning(message["content"]) if message["role"] == "assistant" else (None, "")
            given.append(
                message if reasoning is None else {**message, "content": answer, "reasoning_content": reasoning}
            )
        return given

    def render(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as `tokenizer`'s chat template renders it in this context; a generation prompt ends
        with the reply prefix."""
        text = tokenizer.apply_chat_template(
            self.messages(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs(),
        )
        return text + self.reply_prefix if add_generation_prompt else text

    def template_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"enable_thinking": self.reasoning != "strip"}
        if self.date is not None:  # overrides transformers' global of that name for this render
            kwargs["strftime_now"] = dt.datetime.combine(self.date, dt.time()).strftime
        return kwargs


class AnswerRefused(ValueError):
    """The chat template does not train this answer as evaluation and serving read it; the message says how."""


def transformers_renderer(
    chat_template: str, bos_token: str = "", eos_token: str = "", chat: ChatContext | None = None
) -> ChatRenderer:
    """Render as training does (transformers' own Jinja environment) with these special tokens and the run's
    `chat` context (None: the template's defaults).

    bos_token defaults to "": llama.cpp adds the BOS the GGUF asks for when Ollama tokenizes the prompt, so a
    TEMPLATE that also wrote it would double it.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = chat.template_kwargs() if chat is not None else {}

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        (text,), _ = render_jinja_template(
            [chat.messages(messages) if chat is not None else messages],
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        )
        return text + chat.reply_prefix if chat is not None and add_generation_prompt else text

    return render


def check_probe_answer(render: ChatRenderer, reasoning: Reasoning) -> None:
    """An answer trained under `reasoning` (with reasoning; under strip without) trains as the model writes
    it after the generation prompt and evaluation reads it; raises AnswerRefused otherwise."""
    content = PROBE_ANSWER if reasoning == "strip" else PROBE_REASONED
    prompt = render(PROBE_USER, True)
    answer_piece(prompt, render([*PROBE_USER, {"role": "assistant", "content": content}], False), content)


def _reply_prefix(chat_template: str, chat: ChatContext) -> str:
    """The text the template writes at the start of every reply, before the answer (or its reasoning block),
    whatever the answer says: found by rendering two different probe answers; "" when there is none."""
    render = transformers_renderer(chat_template, chat=chat)
    contents = (
        [PROBE_ANSWER, "OTHERPROBE"]
        if chat.reasoning == "strip"
        else [PROBE_REASONED, PROBE_REASONED.replace("PROBE", "OTHER")]
    )
    prefixes = set()
    try:
        prompt = render(PROBE_USER, True)
        for content in contents:
            whole = render([*PROBE_USER, {"role": "assistant", "content": content}], False)
            common = _whole_tags(os.path.commonprefix([prompt, whole]))
            opened, rest = prompt[len(common) :], whole[len(common) :]
            rest = rest[_overlap(opened, rest) :]  # text the generation prompt ends with already is no prefix
            start = rest.find(content.split()[0])  # the answer's first word, or its `<think>`
            prefixes.add(rest[:start] if start > 0 else "")
    except Exception:  # noqa: BLE001  a template may raise anything rendering the probe: the run's stages say why
        return ""
    return prefixes.pop() if len(prefixes) == 1 else ""


def _whole_tags(common: str) -> str:
    """A common prefix of two renderings cut back to a whole tag (not into `<|...|>`)."""
    return common[: common.rfind("<")] if common.rfind("<") > common.rfind(">") else common


def _overlap(opened: str, rest: str) -> int:
    """How much of `rest` (what the answered turn writes) the generation prompt's own text `opened` ends with."""
    return next(k for k in range(min(len(opened), len(rest)), -1, -1) if opened.endswith(rest[:k]))


def _trains_as_read(chat_template: str, chat: ChatContext) -> bool:
    try:
        check_probe_answer(transformers_renderer(chat_template, chat=chat), chat.reasoning)
    except Exception:  # noqa: BLE001  AnswerRefused, or a template raising anything: the run's stages say why
        return False
    return True


def answer_piece(prompt: str, whole: str, content: str) -> str:
    """The text an assistant turn with `content` trains, given the template's generation prompt `prompt` and
    its rendering `whole` of the conversation ending with that turn. Raises AnswerRefused."""
    if whole.startswith(prompt):
        piece = whole[len(prompt) :]
        reasoning, answer = split_reasoning(content)
        got_reasoning, got_answer = split_reasoning(piece)
        if reasoning and prompt.endswith("<think>") and got_reasoning == "" and got_answer.startswith(answer):
            # The template empties the block its prompt opened (DeepSeek V3.1, every answer): the model writes
            # the reasoning there, as after the prompts of QwQ and the R1 distills.
            piece = content.lstrip().removeprefix("<think>") + got_answer[len(answer) :]
    else:
        common = _whole_tags(os.path.commonprefix([prompt, whole]))
        opened, rest = prompt[len(common) :], whole[len(common) :]
        reasoning, answer = split_reasoning(content)
        # Before the answer the answered turn may write text the prompt ends with already (Command R7B's reply
        # prefix, DeepSeek V3.2's `</think>` after its empty block), and whitespace.
        start = _overlap(opened, rest)
        start += len(rest[start:]) - len(rest[start:].lstrip())
        if not rest[start:].startswith(answer):
            raise AnswerRefused(
                f"the chat template renders this conversation's prefix differently from the whole:"
                f" the generation prompt ends {opened[:60]!r}, the answered conversation goes on "
                f"{rest[:60]!r}"
            )
        if reasoning is None and "<think>" in opened and "</think>" not in opened:
            reasoning, content = "", EMPTY_BLOCK + content.lstrip()  # the model must close the opened block
        if reasoning is None:  # the prompt wrote a closed block (or a channel of its own): the answer follows it
            written = opened + content.lstrip()
        elif content.startswith(opened):
            written = content
        else:
            raise AnswerRefused(
                f"the chat template's generation prompt opens the reasoning with {opened!r}, "
                f"which this answer does not start with ({content[:40]!r}); data.reasoning: wrap "
                "writes every answer's reasoning as one `<think>\\n...\\n</think>` block"
            )
        # The template wrote the answer alone where the model, after `opened`, writes the rest of the block too.
        piece = written[len(opened) :] + rest[start + len(answer) :]
    problem = reasoning_problem(piece, content)
    if problem:
        raise AnswerRefused(problem)
    return piece


def reasoning_problem(piece: str, content: str) -> str | None:
    """Why the trained text `piece` (what the model learns to write after the generation prompt) does not
    split into `content`'s reasoning and answer as evaluation splits the model's output, or None."""
    reasoning, answer = split_reasoning(content)
    got_reasoning, got_answer = split_reasoning(piece)
    # Whitespace aside: some templates trim an answer or fold its blank lines (RWKV World), which is no loss.
    if " ".join(got_answer.split()).startswith(" ".join(answer.split())) and (got_reasoning or None) == (
        reasoning or None
    ):
        return None
    if reasoning and not got_reasoning and reasoning not in piece:
        return (
            "the chat template drops the reasoning of the answer, so data.reasoning would not train it; "
            "set data.reasoning: strip, or a template that writes it"
        )
    return (
        f"the chat template has the model write {piece[:60]!r} after the generation prompt: "
        + ("not a <think> block and then the answer" if reasoning else "markup of its own before the answer")
        + ", which evaluation, parity and the smoke test cannot read as a reply (the markup is no constant "
        "reply prefix that the generation prompt could end with)"
    )
