"""Retention: what fine-tuning made the model forget, on general prompts outside the task.

The base model answers the general prompts (`tunepipe.tasks.chat.general_prompts`: a built-in set in several
languages, and the user's own) greedily, as the evaluate stage generates. Each answer is formatted as training
formats an assistant turn, and both models' mean token loss on those answers is measured with the evaluate
stage's `answer_losses`: the base's own loss is the baseline, and the candidate's rising above it says how much
less likely the candidate finds what the base would say. The candidate also answers the prompts, for the report's
side-by-side view. An answer cut at the length limit is scored without the end of turn the template would add:
the model never said it.

The base's answers and loss are kept in `evaluate/reference/` under a key of its identity, the prompts, the
settings and the code, as the evaluate stage keeps its reference outputs: a retrain only loads the candidate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Example, Message
from tunepipe.tasks.chat.general_prompts import GeneralPrompt
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.data.format import IGNORE, ids_and_labels, tokenize_pieces
from tunepipe.tasks.evaluate.results import RetentionScores
from tunepipe.tasks.evaluate.task import RETENTION_WORKER, _candidate, _file_hash, _read_reference, _write_reference
from tunepipe.tasks.evaluate.worker import (  # noqa: F401  (warm_up: what a worker started early imports)
    ModelToScore,
    _load,
    answer_losses,
    device_and_dtype,
    warm_up,
)
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.caching import StageCache, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import RetentionConfig
from tunepipe.tasks.runtime.gpu_slots import gpu_slots
from tunepipe.tasks.runtime.worker import run_worker
from tunepipe.tasks.train.results import TrainResult


class RetentionOutputs(BaseModel):
    """One model's answers to the general prompts and its loss on the base's answers to them."""

    answers: list[str]
    stopped: list[bool]
    losses: list[float | None]  # per prompt: mean token loss on the base's answer; None: it said nothing to score
    tokens: list[int]  # per prompt: the answer tokens that loss averages
    device: str
    generate_s: float

    @property
    def mean_loss(self) -> float | None:
        """Token-weighted over the prompts, as the eval loss is over examples."""
        scored = [(loss, n) for loss, n in zip(self.losses, self.tokens) if n]
        return sum(loss * n for loss, n in scored) / sum(n for _, n in scored) if scored else None


class RetentionRequest(BaseModel):
    base: ModelToScore
    candidate: ModelToScore
    conversations: list[list[Message]]
    base_outputs: RetentionOutputs | None = None  # kept from an earlier run; None: the base answers first
    max_new_tokens: int
    batch_size: int
    chat: ChatContext  # training's: prompts and answers render as training's texts did


class RetentionResult(BaseModel):
    base: RetentionOutputs
    candidate: RetentionOutputs


def answer_general_prompts(request: RetentionRequest) -> RetentionResult:
    """Worker entry point: the base answers (unless its outputs came with the request) and is scored on its own
    answers; then the candidate (its adapter merged into the base's weights already loaded) is scored on them
    and answers too."""
    import torch

    device, dtype = device_and_dtype()
    conversations = [[m.model_dump() for m in c] for c in request.conversations]

    def run(model, tokenizer, name: str, answers: list[str] | None, stopped: list[bool] | None) -> RetentionOutputs:
        from tunepipe.tasks.chat.generation import greedy_answers
        from tunepipe.tasks.runtime.progress import Progress

        with torch.inference_mode():
            started = time.perf_counter()
            own = greedy_answers(
                model,
                tokenizer,
                conversations,
                request.max_new_tokens,
                request.batch_size,
                Progress(f"retention {name}", len(conversations), "prompts"),
                request.chat,
            )
            seconds = time.perf_counter() - started
            if answers is None:  # the base: scored on what it just said
                answers, stopped = [a.text for a in own], [a.stopped for a in own]
            rows = answer_rows(tokenizer, request.conversations, answers, stopped, request.chat)
            tokens = [sum(label != IGNORE for label in row["labels"][1:]) for row in rows]
            summed = answer_losses(
                model,
                [{**row, "id": str(i)} for i, (row, n) in enumerate(zip(rows, tokens)) if n],
                request.batch_size,
                tokenizer.pad_token_id,
            )
            losses = [summed[str(i)][0] / n if n else None for i, n in enumerate(tokens)]
        outputs = RetentionOutputs(
            answers=[a.text for a in own],
            stopped=[a.stopped for a in own],
            losses=losses,
            tokens=tokens,
            device=device,
            generate_s=seconds,
        )
        print(
            f"retention: {name}: {len(own)} answers in {seconds:.1f} s on {device}, "
            f"loss on the base's answers {outputs.mean_loss}"
        )
        return outputs

    base, loaded = request.base_outputs, None
    if base is None:
        model, tokenizer = _load(request.base, device, dtype)
        base = run(model, tokenizer, "base", None, None)
        same_weights = (request.candidate.weights, request.candidate.revision) == (
            request.base.weights,
            request.base.revision,
        )
        loaded = model if request.candidate.adapter is not None and same_weights else None
    model, tokenizer = _load(request.candidate, device, dtype, loaded)
    candidate = run(model, tokenizer, "candidate", base.answers, base.stopped)
    return RetentionResult(base=base, candidate=candidate)


def answer_rows(
    tokenizer, conversations: list[list[Message]], answers: list[str], stopped: list[bool], chat: ChatContext
) -> list[dict]:
    """Each conversation with its answer as training formats it (`input_ids`, `labels` on the answer's tokens)."""
    examples = [
        Example(
            id=str(i),
            messages=[*conversation, Message(role="assistant", content=answer)],
            source="retention",
            line=i + 1,
        )
        for i, (conversation, answer) in enumerate(zip(conversations, answers))
    ]
    rows = []
    for pieces, answer, ended in zip(tokenize_pieces(tokenizer, examples, chat=chat), answers, stopped, strict=True):
        if not ended:  # cut at the length limit: only what the model said, not the template's end of turn
            *before, (ids, trained) = pieces
            pieces = [*before, (ids[: len(tokenizer(answer, add_special_tokens=False)["input_ids"])], trained)]
        input_ids, labels = ids_and_labels(pieces)
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def measure_retention(
    trained: TrainResult,
    base: BaseModelRef,
    chat: ChatContext,
    prompts: list[GeneralPrompt],
    cfg: RetentionConfig,
    batch_size: int,
    out_dir: Path,
    reference_dir: Path,
    log: logging.Logger | None = None,
) -> RetentionScores | None:
    """Base and candidate on the general prompts; None when there are none."""
    if not prompts:
        return None
    # Loaded as the evaluate stage loads them: in 4-bit after a QLoRA training, as the base was trained.
    four_bit = trained.base_in_4bit
    candidate = _candidate(trained, base).model_copy(update={"load_in_4bit": four_bit})
    base_spec = ModelToScore(
        name="base",
        weights=base.name_or_path,
        revision=base.revision,
        tokenizer=candidate.tokenizer,
        load_in_4bit=four_bit,
    )
    conversations = [prompt.messages for prompt in prompts]
    here = Path(__file__)
    key = stable_hash(
        "retention",
        base.fingerprint,
        four_bit,
        conversations,
        chat,
        cfg.max_new_tokens,
        *(_file_hash(here.with_name(name)) for name in ("retention.py", "task.py", "worker.py")),
        *(_file_hash(here.parents[1] / path) for path in ("chat/generation.py", "data/format.py")),
    )
    kept = _read_reference(reference_dir, "retention-base", key, RetentionOutputs)
    request = RetentionRequest(
        base=base_spec,
        candidate=candidate,
        conversations=conversations,
        base_outputs=kept,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=batch_size,
        chat=chat,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with gpu_slots():
        result = run_worker(RETENTION_WORKER, request, RetentionResult, out_dir / "worker", log=log)
    if kept is None:
        _write_reference(reference_dir, "retention-base", key, result.base)
    if result.base.mean_loss is None:  # only answers cut before a word: there is nothing the base would say
        (log or logging.getLogger(__name__)).warning(
            "retention: the base's answers to the %d general prompts are all empty and cut at the length limit: "
            "nothing to measure forgetting on",
            len(prompts),
        )
        return None

    path = out_dir / "retention.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i, prompt in enumerate(prompts):
            out.write(
                json.dumps(
                    {
                        "id": prompt.id,
                        "source": prompt.source,
                        "language": prompt.language,
                        "prompt": prompt.prompt,
                        "tokens": result.base.tokens[i],
                        **{
                            who: {
                                "answer": outputs.answers[i],
                                "stopped": outputs.stopped[i],
                                "loss": outputs.losses[i],
                            }
                            for who, outputs in (("base", result.base), ("candidate", result.candidate))
                        },
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return RetentionScores(
        n_prompts=len(prompts), base_loss=result.base.mean_loss, candidate_loss=result.candidate.mean_loss, path=path
    )


@task(
    name="retention",
    cache_policy=StageCache(
        sources=("tunepipe.tasks.evaluate.task", "tunepipe.tasks.evaluate.worker", "tunepipe.tasks.chat.generation")
    ),
    persist_result=True,
)
def retention(
    trained: TrainResult,
    base: BaseModelRef,
    chat: ChatContext,
    prompts: list[GeneralPrompt],
    cfg: RetentionConfig,
    batch_size: int,
    workdir: Path,
) -> RetentionScores | None:
    out_dir = stage_dir(workdir, "retention", trained, base, chat, prompts, cfg, batch_size)
    return measure_retention(
        trained,
        base,
        chat,
        prompts,
        cfg,
        batch_size,
        out_dir,
        Path(workdir) / "evaluate" / "reference",
        log=get_run_logger(),
    )
