"""Format conversations with the model's own chat template and mark which tokens carry the loss.

Loss masks come from rendering prefixes of the conversation: the tokens added by an assistant message
(its content, end-of-turn marker and anything the template appends) are trained; system and user tokens
and the assistant header are not. This works for any template whose rendering of a prefix is a prefix of
the full rendering, and we check that instead of assuming it.

Preference rows are formatted the same way and marked with their `kind`: a DPO row also carries
its rejected answer's ids and labels (`rejected_input_ids`, `rejected_labels`: the same prompt, the other
answer); rated-bad answers (`undesirable`) join the train split for KTO, and each held-out split's are a split
of their own (`validation_undesirable`, `eval_undesirable`), scored apart from the good answers. A preference
row's labels always cover the answer alone, as TRL scores completions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain, zip_longest
from pathlib import Path

from prefect import task

from tunepipe.tasks.chat.examples import Example, read_examples, split_reasoning, write_jsonl
from tunepipe.tasks.chat.template import AnswerRefused, ChatContext, answer_piece
from tunepipe.tasks.data.files import Rejection
from tunepipe.tasks.data.results import CheckedData, FormattedData, FormattedSplit, TokenizedSplits
from tunepipe.tasks.runtime.base_model import BaseModelRef, load_tokenizer
from tunepipe.tasks.runtime.caching import STAGE_CACHE, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import ModelConfig

IGNORE = -100  # label value the loss skips

# One conversation's token ids, piece by piece (see `_pieces`), each with whether it is an assistant turn.
Pieces = list[tuple[list[int], bool]]


class FormatRefused(ValueError):
    """The chat template cannot train this conversation as evaluation and serving read it."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def format_dataset(
    train_examples: Path,
    eval_examples: Path,
    base: BaseModelRef,
    cfg: ModelConfig,
    out_dir: Path,
    assistant_only_loss: bool = True,
    tokens: TokenizedSplits | None = None,
    chat: ChatContext | None = None,
    undesirable: tuple[Path | None, Path | None] = (None, None),
    validation_examples: Path | None = None,
    validation_undesirable: Path | None = None,
) -> FormattedData:
    """Write each split's token ids and labels, rendered with `chat` (None: the data check's, in `tokens`);
    `tokens` (the data check's, for these files) saves tokenizing again, and is used only if it was made with
    this base model's tokenizer, `cfg.chat_template` and `chat`. `undesirable`: the train and eval (test) files
    of rated-bad answers, if any; `validation_undesirable`: the validation split's."""
    if chat is None:
        chat = tokens.chat if tokens is not None else ChatContext()
    if tokens is not None and tokens.tokenizer != tokenizer_key(base, cfg.chat_template, chat):
        tokens = None
    tokenizer = None

    def tokenized(examples: list[Example]) -> Iterator[Pieces]:
        nonlocal tokenizer
        tokenizer = tokenizer or load_tokenizer(base, cfg.chat_template)
        return tokenize_pieces(tokenizer, examples, chat=chat)

    out_dir.mkdir(parents=True, exist_ok=True)
    splits, rejected = {}, []
    # Eval loss always scores the answers alone, so it means the same whatever the training objective.
    named = [
        ("train", train_examples, assistant_only_loss),
        ("validation", validation_examples, True),
        ("eval", eval_examples, True),
    ]
    for name, path, answers_only in [split for split in named if split[1] is not None]:
        examples = list(read_examples(path))
        pieces = _read_pieces(getattr(tokens, name), examples) if tokens is not None else tokenized(examples)
        pairs = [example for example in examples if example.kind == "pair"]
        bad = list(read_examples(undesirable[0])) if name == "train" and undesirable[0] else []
        extra = _preference_pieces(pairs, bad, tokenized)
        splits[name], too_long = _format_split(
            examples + bad,
            chain(pieces, extra.pop("undesirable")),
            out_dir / f"{name}.jsonl",
            cfg.max_seq_length,
            answers_only,
            extra["rejected"],
        )
        rejected += too_long
    for name, path in (("validation_undesirable", validation_undesirable), ("eval_undesirable", undesirable[1])):
        held_bad = list(read_examples(path)) if path else []
        if held_bad:
            splits[name], too_long = _format_split(
                held_bad, tokenized(held_bad), out_dir / f"{name}.jsonl", cfg.max_seq_length, True
            )
            rejected += too_long
    quarantine = out_dir / "quarantine.jsonl"
    n_quarantined = write_jsonl(quarantine, rejected)
    for name, split in splits.items():
        if split.n_rows == 0:
            raise ValueError(
                f"no {name} example fits model.max_seq_length={cfg.max_seq_length} tokens; "
                f"see {quarantine} for the {n_quarantined} rejected rows"
            )
    return FormattedData(**splits, quarantine_path=quarantine, n_quarantined=n_quarantined, chat=chat)


def _preference_pieces(pairs: list[Example], bad: list[Example], tokenized) -> dict:
    """Pieces of the pairs' rejected answers (by example id) and of the rated-bad examples, tokenized here: the
    data check's token ids cover the good answers only."""
    if not pairs and not bad:
        return {"rejected": {}, "undesirable": iter(())}
    swapped = [
        example.model_copy(
            update={
                "messages": [*example.prompt, example.messages[-1].model_copy(update={"content": example.rejected})]
            }
        )
        for example in pairs
    ]
    pieces = list(tokenized(swapped + bad))
    return {"rejected": {example.id: p for example, p in zip(pairs, pieces)}, "undesirable": iter(pieces[len(pairs) :])}


def tokenizer_key(base: BaseModelRef, chat_template: str | None, chat: ChatContext) -> str:
    """Identifies what token ids depend on: the base model's tokenizer files, the chat template and context."""
    return stable_hash(base, chat_template, chat)


def tokenize_conversation(
    tokenizer, example: Example, assistant_only: bool = True, chat: ChatContext | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels that train the assistant turns (or everything)."""
    return tokenize_conversations(tokenizer, [example], assistant_only, chat=chat)[0]


def tokenize_conversations(
    tokenizer,
    examples: list[Example],
    assistant_only: bool = True,
    batch_size: int = 512,
    chat: ChatContext | None = None,
) -> list[tuple[list[int], list[int]]]:
    """`tokenize_conversation` for many examples, with the tokenizer called once per batch of pieces."""
    return [ids_and_labels(pieces, assistant_only) for pieces in tokenize_pieces(tokenizer, examples, batch_size, chat)]


def ids_and_labels(pieces: Pieces, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """A conversation's token ids, and labels that train its assistant turns (or everything)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids += ids
        labels += ids if trained or not assistant_only else [IGNORE] * len(ids)
    return input_ids, labels


def final_answer_only(pieces: Pieces) -> Pieces:
    """Only the final assistant turn trained: a preference row scores its answer (TRL's completion) alone."""
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    return [(ids, i == last) for i, (ids, _) in enumerate(pieces)]


def tokenize_pieces(
    tokenizer, examples: list[Example], batch_size: int = 512, chat: ChatContext | None = None, refusals: bool = False
) -> Iterator[Pieces | FormatRefused]:
    """Each example's pieces as token ids (rendered with `chat`; None: the template's defaults), with the
    tokenizer called once per batch of pieces. An example the template cannot train raises FormatRefused,
    or with `refusals` is answered by it (the data check quarantines such rows).

    Each piece of the rendered text (prompt up to the assistant header, then the assistant's turn) is
    tokenized on its own, as at inference, where the prompt ends at the header and the model's tokens
    follow. Tokenizing the joined text instead could merge tokens across the boundary (a "\n" ending the
    header with a "\n" starting the answer) and leave no clean cut between prompt and answer. Batching the
    pieces lets the fast tokenizer work on many at once: the same ids, several times faster.
    """
    for start in range(0, len(examples), batch_size):
        pieces = [
            _pieces_or_refusal(tokenizer, example, chat, refusals) for example in examples[start : start + batch_size]
        ]
        texts = [text for example_pieces in pieces if isinstance(example_pieces, list) for text, _ in example_pieces]
        ids_of_text = iter(_encode(tokenizer, texts))
        for example_pieces in pieces:
            yield (
                example_pieces
                if isinstance(example_pieces, FormatRefused)
                else [(next(ids_of_text), trained) for _, trained in example_pieces]
            )


def _pieces_or_refusal(
    tokenizer, example: Example, chat: ChatContext | None, refusals: bool
) -> list[tuple[str, bool]] | FormatRefused:
    try:
        return _pieces(tokenizer, example, chat)
    except FormatRefused as exc:
        if not refusals:
            raise
        return exc


def tokens_line(example: Example, pieces: Pieces) -> str:
    """One line of a `TokenizedSplits` file."""
    return json.dumps({"id": example.id, "pieces": pieces})


def _read_pieces(path: Path, examples: list[Example]) -> Iterator[Pieces]:
    """The pieces of `examples`, in order, from the `TokenizedSplits` file made for them."""
    with path.open(encoding="utf-8") as lines:
        for example, line in zip_longest(examples, lines):
            row = json.loads(line) if line is not None else None
            if example is None or row is None or row["id"] != example.id:
                raise RuntimeError(f"{path} does not hold the token ids of the examples it was given with")
            yield row["pieces"]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text; the special tokens the template wrote are in the text already."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not texts:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    # The Rust tokenizer directly: transformers' conversion of each result to Python dicts costs a third as much
    # again as the tokenization itself.
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _pieces(tokenizer, example: Example, chat: ChatContext | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut before and after each assistant turn, each piece with whether it is one.

    Only those cuts decide the labels, so only those prefixes are rendered: what lies between two answers
    (system and user turns, then the assistant header) is one piece, tokenized as one text as at inference.
    An assistant turn trains what the model writes after the generation prompt
    (`tunepipe.tasks.chat.template.answer_piece`).
    """
    messages = [m.model_dump() for m in example.messages]
    pieces: list[tuple[str, bool]] = []
    rendered, answered = "", []  # the text so far; the fields of the answers in it, with their reasoning

    def untrained(text: str) -> None:
        if not text.startswith(rendered):
            dropped = next((field for field, reasoning in answered if reasoning and reasoning not in text), None)
            raise FormatRefused(
                example.where,
                (
                    f"the chat template renders the answer in {dropped} without its reasoning once more turns "
                    "follow (QwQ, DeepSeek-R1), so a conversation with several answers cannot be one training "
                    "sequence; make one row per answer"
                    if dropped
                    else "the chat template renders this conversation's prefix differently from the whole; set "
                    "model.chat_template to one that renders turns incrementally"
                ),
            )
        pieces.append((text[len(rendered) :], False))

    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:turn], True, chat)
        untrained(prompt)
        field = f"messages[{turn}].content"
        try:
            piece = answer_piece(prompt, _render(tokenizer, messages[: turn + 1], False, chat), message["content"])
        except AnswerRefused as exc:
            raise FormatRefused(
                example.where,
                f"{exc} ({field}); set model.chat_template to a template that renders it, or change data.reasoning",
            ) from exc
        pieces.append((piece, True))
        rendered = prompt + piece
        answered.append((field, split_reasoning(message["content"])[0]))
    if messages and messages[-1]["role"] != "assistant":
        untrained(_render(tokenizer, messages, False, chat))
    return pieces


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, chat: ChatContext | None) -> str:
    if not messages:
        return ""
    # The template writes every special token itself, so the tokenizer must not add a BOS again.
    if chat is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return chat.render(tokenizer, messages, add_generation_prompt)


def _format_split(
    examples: list[Example],
    pieces: Iterator[Pieces],
    out_path: Path,
    max_tokens: int,
    assistant_only: bool,
    rejected: dict[str, Pieces] | None = None,
) -> tuple[FormattedSplit, list[Rejection]]:
    n_rows = n_tokens = n_trained = longest = 0
    too_long: list[Rejection] = []
    with out_path.open("w", encoding="utf-8") as out:
        for example, example_pieces in zip(examples, pieces, strict=True):
            preference = example.kind != "sft"
            input_ids, labels = (
                ids_and_labels(final_answer_only(example_pieces))
                if preference
                else ids_and_labels(example_pieces, assistant_only)
            )
            row = {"id": example.id, "input_ids": input_ids, "labels": labels}
            if preference:
                row["kind"] = example.kind
            if example.kind == "pair":
                row["rejected_input_ids"], row["rejected_labels"] = ids_and_labels(
                    final_answer_only(rejected[example.id])
                )
            length = max(len(input_ids), len(row.get("rejected_input_ids", ())))  # both answers must fit
            if length > max_tokens:
                # Truncating would cut the answer and its end-of-turn token: the model would learn not to stop.
                too_long.append(
                    Rejection(
                        source=example.source,
                        line=example.line,
                        unit=example.unit,
                        field="messages",
                        reason=f"{length} tokens > max_seq_length {max_tokens}",
                        raw=example.model_dump_json(),
                        stage="format",
                    )
                )
                continue
            out.write(json.dumps(row) + "\n")
            n_rows += 1
            n_tokens += len(input_ids)
            n_trained += len(labels) - labels.count(IGNORE)
            longest = max(longest, length)
    split = FormattedSplit(
        path=out_path, n_rows=n_rows, n_tokens=n_tokens, n_trained_tokens=n_trained, max_tokens=longest
    )
    return split, too_long


@task(name="format_data", cache_policy=STAGE_CACHE, persist_result=True)
def format_data(
    checked: CheckedData, base: BaseModelRef, cfg: ModelConfig, assistant_only_loss: bool, workdir: Path
) -> FormattedData:
    out_dir = stage_dir(workdir, "format_data", checked, base, cfg, assistant_only_loss)
    return format_dataset(
        checked.train.clean_path,
        checked.eval.clean_path,
        base,
        cfg,
        out_dir,
        assistant_only_loss,
        checked.tokens,
        undesirable=(checked.train.undesirable_path, checked.eval.undesirable_path),
        validation_examples=checked.validation.clean_path,
        validation_undesirable=checked.validation.undesirable_path,
    )
