"""The evaluation worker: in a process of its own, each model the evaluate stage scores answers every conversation
it is given and has its eval loss measured; the raw outputs go back to the stage (`tunepipe.tasks.evaluate.task`),
which scores them.

Each model answers greedily (`tunepipe.tasks.chat.generation`: batched, static KV cache, a CUDA graph per decode
step on a GPU), on CUDA in bf16 when there is a GPU (fp16 where it has no bf16), one model at a time, in batches the
memory left beside the weights holds. After QLoRA every model is loaded in 4-bit as training loaded the base, the
adapter beside it (unmerged); the exported GGUF is the adapter merged into the 16-bit base, and parity measures
what separates the two. Its eval loss is the mean token loss on the held-out assistant tokens, computed exactly as
in training, with each row's summed loss and number of answer tokens beside it. The retention worker
(`tunepipe.tasks.evaluate.retention`) loads its models and measures its losses with the same functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Message
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.data.format import IGNORE


class ModelToScore(BaseModel):
    """Where the worker loads one model from."""

    name: str
    weights: str  # HF folder or hub id
    revision: str | None = None
    adapter: Path | None = None  # a PEFT adapter, merged into `weights` before generating (beside a 4-bit base)
    tokenizer: str  # folder whose tokenizer and chat template render the prompts
    load_in_4bit: bool = False  # NF4, as QLoRA's training loaded the base (CUDA only)


class GenerationRequest(BaseModel):
    models: list[ModelToScore]
    conversations: list[list[Message]]  # the held-out prompts, the probes, then the rated-bad examples' prompts
    loss_rows: Path  # formatted held-out rows (input_ids, labels) for the eval loss
    undesirable_rows: Path | None = None  # formatted held-out rated-bad answers, for their loss
    max_new_tokens: int
    batch_size: int
    chat: ChatContext  # training's: prompts render as training's texts did
    gpu_memory_gib: float | None = None  # model.gpu_memory_gib: the worker's CUDA allocator is capped there


class ModelOutputs(BaseModel):
    """One model's raw results, before scoring: what the reference cache keeps."""

    answers: list[str]  # aligned with the request's conversations
    stopped: list[bool]
    eval_loss: float
    # Per held-out row, by id: (summed token loss, answer tokens); eval_loss is their token-weighted mean.
    example_losses: dict[str, tuple[float, int]] = {}
    undesirable_loss: float | None = None
    device: str
    generate_s: float  # wall time of generation, CUDA graph capture included


class GenerationResult(BaseModel):
    outputs: dict[str, ModelOutputs]


def generate_outputs(request: GenerationRequest) -> GenerationResult:
    """Worker entry point: load each model in turn, answer every conversation, measure the eval loss."""
    import torch

    from tunepipe.tasks.chat.generation import greedy_answers
    from tunepipe.tasks.runtime.memory_plan import cap_gpu_memory
    from tunepipe.tasks.runtime.progress import Progress

    device, dtype = device_and_dtype()
    cap_gpu_memory(request.gpu_memory_gib)
    rows = [json.loads(line) for line in request.loss_rows.read_text().splitlines()]
    bad_rows = (
        [json.loads(line) for line in request.undesirable_rows.read_text().splitlines()]
        if request.undesirable_rows is not None
        else []
    )
    conversations = [[m.model_dump() for m in c] for c in request.conversations]
    outputs = {}
    # Plain weights first, those an adapter goes on last among them: the candidate then takes its adapter on
    # the base's weights already on the device, instead of reading them again.
    adapter_bases = {(spec.weights, spec.revision) for spec in request.models if spec.adapter is not None}
    order = sorted(
        request.models, key=lambda spec: (spec.adapter is not None, (spec.weights, spec.revision) in adapter_bases)
    )
    plain = None  # ((weights, revision), model) of the last model loaded without an adapter
    for spec in order:
        source = (spec.weights, spec.revision)
        reusable = plain[1] if spec.adapter is not None and plain and plain[0] == source else None
        model, tokenizer = _load(spec, device, dtype, reusable)
        batch_size = _batch_that_fits(model, request, rows, dtype, device, spec.name)
        while True:
            try:
                with torch.inference_mode():
                    started = time.perf_counter()
                    answers = greedy_answers(
                        model,
                        tokenizer,
                        conversations,
                        request.max_new_tokens,
                        batch_size,
                        Progress(f"evaluate {spec.name}", len(conversations), "prompts"),
                        request.chat,
                    )
                    seconds = time.perf_counter() - started
                    losses = answer_losses(model, rows, batch_size, tokenizer.pad_token_id)
                    loss = mean_answer_loss(losses)
                    bad_loss = (
                        mean_answer_loss(answer_losses(model, bad_rows, batch_size, tokenizer.pad_token_id))
                        if bad_rows
                        else None
                    )
                break
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
            torch.cuda.empty_cache()  # after the except block: the failed batch's cache and graph are released
            batch_size //= 2
            print(f"evaluate: {spec.name}: CUDA out of memory; again in batches of {batch_size}", flush=True)
        print(
            f"evaluate: {spec.name}: {len(answers)} answers in {seconds:.1f} s on {device}, eval loss {loss:.4f}"
            + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "")
        )
        outputs[spec.name] = ModelOutputs(
            answers=[a.text for a in answers],
            stopped=[a.stopped for a in answers],
            eval_loss=loss,
            example_losses=losses,
            undesirable_loss=bad_loss,
            device=device,
            generate_s=seconds,
        )
        plain = (source, model) if spec.adapter is None else None
        del model
        if device == "cuda" and plain is None:
            torch.cuda.empty_cache()
    return GenerationResult(outputs=outputs)


def device_and_dtype():
    """Where a worker puts the models it scores: CUDA in bf16 where there is a GPU (fp16 on one without bf16, a T4,
    as training computes there: fp32 would double the weights), else the CPU in float32."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, torch.float32
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def warm_up(_: str) -> None:
    """What an evaluation worker started early (`tunepipe.tasks.runtime.worker.prestart_worker`) imports before its
    request comes: what `generate_outputs` loads every model with."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def _load(spec: ModelToScore, device: str, dtype, loaded=None):
    """The model `spec` names, on `device`; `loaded`: its weights already there (they take the adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The 4-bit layout QLoRA trained on (tasks/train/loop.py), so the adapter meets the weights it learnt against.
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        if spec.load_in_4bit
        else None
    )
    # Read straight onto the device: no copy in host memory first.
    model = (
        loaded
        if loaded is not None
        else AutoModelForCausalLM.from_pretrained(
            spec.weights,
            revision=spec.revision,
            dtype=dtype,
            attn_implementation="sdpa",
            device_map=device,
            quantization_config=quantization,
        )
    )
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter)
        # Merged into a 16-bit base, as it is exported and served, and faster than beside it; a 4-bit base keeps
        # it beside (merging would round the delta into the 4-bit blocks).
        if not spec.load_in_4bit:
            model = model.merge_and_unload()
    return model.eval(), tokenizer


def _batch_that_fits(model, request: GenerationRequest, rows: list[dict], dtype, device: str, name: str) -> int:
    """`request.batch_size`, or fewer rows where the KV cache and logits of that many would not fit the GPU
    memory left beside the weights (an out-of-memory error still halves it)."""
    import torch

    from tunepipe.tasks.runtime.memory_plan import (
        free_gpu_bytes,
        generation_row_bytes,
        loss_row_bytes,
        model_shape,
        rows_that_fit,
    )

    if device != "cuda" or not rows:
        return request.batch_size
    shape = model_shape(model.config)
    longest = max(len(row["input_ids"]) for row in rows)
    answer_share = sum(sum(t != IGNORE for t in row["labels"]) for row in rows) / sum(len(r["labels"]) for r in rows)
    width = dtype.itemsize
    row = max(
        generation_row_bytes(shape, longest + request.max_new_tokens, width),
        loss_row_bytes(shape, longest, width, answer_share),
    )
    fitting = max(
        1,
        rows_that_fit(free_gpu_bytes(torch.cuda.current_device(), request.gpu_memory_gib), 0, row, request.batch_size),
    )
    if fitting < request.batch_size:
        print(
            f"evaluate: {name}: batches of {fitting} (eval.batch_size {request.batch_size}): the GPU memory left "
            f"beside the weights holds that many rows of {longest + request.max_new_tokens} tokens",
            flush=True,
        )
    return fitting


def mean_answer_loss(losses: dict[str, tuple[float, int]]) -> float:
    """Token-weighted mean cross-entropy over every assistant token of the split."""
    return sum(total for total, _ in losses.values()) / sum(count for _, count in losses.values())


def answer_losses(model, rows: list[dict], batch_size: int, pad_id: int) -> dict[str, tuple[float, int]]:
    """Each row's summed cross-entropy over its assistant tokens and their number, by row id (rows are batched
    sorted by length)."""
    import torch

    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    losses = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        input_ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in batch])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        # Logits from the batch's first scored position on: the prompts' would only take memory.
        positions = (labels[:, 1:] != IGNORE).any(0).nonzero()
        if not len(positions):
            continue
        first = int(positions[0])
        logits = model(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            logits_to_keep=width - first,
        ).logits
        targets = labels[:, first + 1 :].to(model.device)
        scored = targets != IGNORE
        # Only the answer positions go to float32: the full logits of a batch would not fit on a small GPU.
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1][scored].float(), targets[scored], reduction="none"
        )
        row_of_token = scored.nonzero()[:, 0]
        sums = torch.zeros(len(batch), device=token_losses.device).index_add_(0, row_of_token, token_losses)
        for row, total, count in zip(batch, sums.tolist(), scored.sum(dim=1).tolist()):
            before = losses.get(str(row["id"]), (0.0, 0))  # a duplicated row counts as often as it is there
            losses[str(row["id"])] = (before[0] + total, before[1] + int(count))
    return losses
