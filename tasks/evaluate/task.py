"""Score the candidate, the base model and the champion on the same held-out examples with the same metrics.

Either held-out split: each attempt of the retrain loop is scored on validation, which the loop's choices read;
the final candidate once on test, which only the gate, the champion comparison, the headline and parity read.
The probes are asked on test only: they are shown in the report, and no choice reads them.

Each model answers every held-out prompt and every probe greedily (`tunepipe.tasks.chat.generation`: batched, static KV
cache, a CUDA graph per decode step on a GPU) in a worker process of its own, on CUDA in bf16 when there
is a GPU (fp16 where it has no bf16), one model at a time, in batches the memory left beside the weights holds.
After QLoRA every model is loaded in 4-bit as training loaded the base, the adapter beside it (unmerged); the
exported GGUF is the adapter merged into the 16-bit base, and parity measures what separates the two. Its
answers are scored by `tunepipe.tasks.chat.metrics` (valid JSON, exact match, per-field accuracy, key F1,
required keys from the training answers; ROUGE-L and chrF for free text; stop rate), and its eval loss is
the mean token loss on the held-out assistant tokens, computed exactly as in training. samples.jsonl keeps every
score per example, each example's own eval loss (the mean over its answer tokens) and its number of answer
tokens, so the gate's intervals of eval_loss are token-weighted as the split's value is.

Held-out rated-bad answers, when the data has them, are scored apart: `undesirable_close_rate`,
how often a model's own answer to such a prompt is close to the answer users rated bad (`metrics.close_to`:
the same JSON object, or text with a similarity ratio of at least 0.9), and `undesirable_loss`, the mean token
loss of those bad answers (higher: the model finds them less likely). They are reported and tracked; the gate
rules do not name them, so the gate decides as before.

The candidate changes with every training; the base model and the champion do not. Their raw outputs
(answers, stop flags, eval loss, probe answers) are kept in `evaluate/reference/` under a key of the
model's identity (base fingerprint; champion name, version and run), the eval data, the eval settings and
this stage's code, so a retrain, or a run against the same champion, generates only the candidate's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Message, read_examples
from tunepipe.tasks.chat.metrics import close_to, required_keys, score_answers
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.data.format import IGNORE
from tunepipe.tasks.data.results import CheckedData, FormattedData, HeldOutSplit
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores
from tunepipe.tasks.integrations.model_registry import ChampionRef, download_champion
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.caching import StageCache, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import DataConfig, EvalConfig
from tunepipe.tasks.runtime.gpu_slots import gpu_slots
from tunepipe.tasks.runtime.worker import EVALUATE_WORKER, prestart_worker, run_worker
from tunepipe.tasks.train.results import TrainResult


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


# The retention stage's worker (tasks/evaluate/retention.py), named here so this stage can start it early.
RETENTION_WORKER = "tunepipe.tasks.evaluate.retention:answer_general_prompts"


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


def evaluate_models(
    data: FormattedData,
    eval_examples: Path,
    train_examples: Path,
    trained: TrainResult,
    base: BaseModelRef,
    champion: ChampionRef | None,
    tracking_uri: str,
    data_cfg: DataConfig,
    cfg: EvalConfig,
    out_dir: Path,
    reference_dir: Path,
    undesirable_examples: Path | None = None,
    log: logging.Logger | None = None,
    split: HeldOutSplit = "test",
    gpu_memory_gib: float | None = None,
) -> EvalReport:
    """Score the candidate, the base and the champion on `split`, whose examples are `eval_examples`; `log`
    receives the worker's lines (the stage's own logger, so they show in the run's log). After a QLoRA training
    every model is loaded in 4-bit, as training loaded the base: like for like, and within the card that trained
    it."""
    loss_rows, bad_rows = data.held_out(split)
    examples = list(read_examples(eval_examples))[: cfg.max_samples]
    bad = list(read_examples(undesirable_examples))[: cfg.max_samples] if undesirable_examples else []
    asked = cfg.probes if split == "test" else []
    probes = [_probe_conversation(probe, data_cfg.system_prompt) for probe in asked]
    conversations = [example.prompt for example in examples] + probes + [example.prompt for example in bad]
    four_bit = trained.base_in_4bit
    candidate = _candidate(trained, base).model_copy(update={"load_in_4bit": four_bit})
    models = {
        "candidate": candidate,
        "base": ModelToScore(
            name="base",
            weights=base.name_or_path,
            revision=base.revision,
            tokenizer=candidate.tokenizer,
            load_in_4bit=four_bit,
        ),
    }
    # The reference models' outputs are reused while the model, the eval data, the settings and the code are.
    fingerprint = stable_hash(
        _file_hash(loss_rows.path),
        _file_hash(eval_examples),
        asked,
        *(_file_hash(path) for path in (undesirable_examples,) if path is not None),
        data_cfg.system_prompt,
        data.chat,
        cfg,
        _file_hash(Path(__file__)),
        _file_hash(Path(__file__).parents[1] / "chat" / "generation.py"),
        four_bit,
    )
    reference_keys = {"base": stable_hash("base", base.fingerprint, fingerprint)}
    if champion is not None:
        champion_dir = download_champion(tracking_uri, champion, reference_dir.parent / "champions")
        models["champion"] = ModelToScore(
            name="champion", weights=str(champion_dir), tokenizer=str(champion_dir), load_in_4bit=four_bit
        )
        reference_keys["champion"] = stable_hash(
            "champion", champion.name, champion.version, champion.run_id, champion.source, fingerprint
        )
    outputs = {
        name: cached
        for name, key in reference_keys.items()
        if (cached := _read_reference(reference_dir, name, key)) is not None
    }
    todo = [spec for name, spec in models.items() if name not in outputs]
    request = GenerationRequest(
        models=todo,
        conversations=conversations,
        loss_rows=loss_rows.path,
        undesirable_rows=bad_rows.path if bad and bad_rows else None,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        chat=data.chat,
        gpu_memory_gib=gpu_memory_gib,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with gpu_slots():  # the worker puts each model on the GPU (bf16) where there is one
        generated = run_worker(EVALUATE_WORKER, request, GenerationResult, out_dir / "worker", log=log).outputs
    for name, result in generated.items():
        if name in reference_keys:
            _write_reference(reference_dir, name, reference_keys[name], result)
    outputs.update(generated)

    required = (
        required_keys(example.answer for example in read_examples(train_examples))
        if data_cfg.output_format == "json"
        else []
    )
    references = [example.answer for example in examples]
    n = len(examples)
    scores, per_example = {}, {}
    for name, result in outputs.items():
        means, per_example[name] = score_answers(
            result.answers[:n], references, result.stopped[:n], data_cfg.output_format, required
        )
        # Each example's own eval loss (the mean over its answer tokens), for the gate's paired intervals.
        for example, example_scores in zip(examples, per_example[name]):
            if example.id in result.example_losses:
                total, count = result.example_losses[example.id]
                example_scores["eval_loss"] = total / count
        if bad:
            own = result.answers[len(conversations) - len(bad) :]
            means["undesirable_close_rate"] = sum(map(close_to, own, (e.answer for e in bad))) / len(bad)
            if result.undesirable_loss is not None:
                means["undesirable_loss"] = result.undesirable_loss
        scores[name] = ModelScores(
            name=name,
            version=champion.version if name == "champion" else None,
            metrics={"eval_loss": result.eval_loss, **means},
        )

    order = [name for name in ("base", "champion", "candidate") if name in outputs]
    samples_path = out_dir / "samples.jsonl"
    tokens = outputs["candidate"].example_losses
    with samples_path.open("w", encoding="utf-8") as out:
        for i, example in enumerate(examples):
            out.write(
                json.dumps(
                    {
                        "id": example.id,
                        "source": f"{example.source}:{example.line}",
                        "prompt": example.prompt[-1].content,
                        "expected": example.answer,
                        # What weighs the example in the token-weighted eval_loss (the same tokens for every model).
                        **({"answer_tokens": tokens[example.id][1]} if example.id in tokens else {}),
                        **{
                            name: {
                                "answer": outputs[name].answers[i],
                                "stopped": outputs[name].stopped[i],
                                "scores": per_example[name][i],
                            }
                            for name in order
                        },
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    undesirable_path = out_dir / "undesirable.jsonl" if bad else None
    if bad:
        with undesirable_path.open("w", encoding="utf-8") as out:
            for i, example in enumerate(bad, start=len(conversations) - len(bad)):
                answers = {name: outputs[name].answers[i] for name in order}
                out.write(
                    json.dumps(
                        {
                            "id": example.id,
                            "source": f"{example.source}:{example.line}",
                            "prompt": example.prompt[-1].content,
                            "rated_bad_answer": example.answer,
                            **{
                                name: {"answer": answer, "close": close_to(answer, example.answer)}
                                for name, answer in answers.items()
                            },
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    probes_path = out_dir / "probes.jsonl"
    with probes_path.open("w", encoding="utf-8") as out:
        for i, probe in enumerate(asked, start=n):
            out.write(
                json.dumps({"prompt": probe, **{name: outputs[name].answers[i] for name in order}}, ensure_ascii=False)
                + "\n"
            )
    return EvalReport(
        split=split,
        n_samples=n,
        n_undesirable=len(bad),
        undesirable_path=undesirable_path,
        candidate=scores["candidate"],
        base=scores["base"],
        champion=scores.get("champion"),
        samples_path=samples_path,
        probes_path=probes_path,
    )


def _candidate(trained: TrainResult, base: BaseModelRef) -> ModelToScore:
    """A LoRA adapter is merged into the base; a full fine-tune is a model folder of its own."""
    folder = trained.adapter_dir
    if trained.kind == "lora":
        return ModelToScore(
            name="candidate", weights=base.name_or_path, revision=base.revision, adapter=folder, tokenizer=str(folder)
        )
    return ModelToScore(name="candidate", weights=str(folder), tokenizer=str(folder))


def _probe_conversation(probe: str, system_prompt: str | None) -> list[Message]:
    # Probes are asked the way training examples were: with the data's system prompt when it sets one.
    system = [Message(role="system", content=system_prompt)] if system_prompt else []
    return [*system, Message(role="user", content=probe)]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_reference(reference_dir: Path, name: str, key: str, kind: type[BaseModel] = ModelOutputs):
    path = reference_dir / f"{name}-{key[:16]}.json"
    return kind.model_validate_json(path.read_text()) if path.is_file() else None


def _write_reference(reference_dir: Path, name: str, key: str, outputs: BaseModel) -> None:
    reference_dir.mkdir(parents=True, exist_ok=True)
    partial = reference_dir / f"{name}-{key[:16]}.partial"
    partial.write_text(outputs.model_dump_json())
    partial.replace(partial.with_suffix(".json"))


@task(
    name="evaluate",
    cache_policy=StageCache(sources=("tunepipe.tasks.chat.generation", "tunepipe.tasks.chat.metrics")),
    persist_result=True,
)
def evaluate(
    data: FormattedData,
    checked: CheckedData,
    trained: TrainResult,
    base: BaseModelRef,
    champion: ChampionRef | None,
    tracking_uri: str,
    data_cfg: DataConfig,
    cfg: EvalConfig,
    workdir: Path,
    *,
    split: HeldOutSplit,
    gpu_memory_gib: float | None = None,
) -> EvalReport:
    """Score on `split`: `validation` for the choices before the gate, `test` once, for the gate."""
    held_out = checked.held_out(split)
    out_dir = stage_dir(
        workdir,
        "evaluate",
        split,
        data,
        held_out.clean_path,
        checked.train.clean_path,
        trained,
        base,
        champion,
        data_cfg,
        cfg,
        held_out.undesirable_path,
    )
    if split == "validation" and (cfg.retention.builtin or cfg.retention.prompts):
        prestart_worker(RETENTION_WORKER)  # the retention stage follows: its worker imports while this one answers
    return evaluate_models(
        data,
        held_out.clean_path,
        checked.train.clean_path,
        trained,
        base,
        champion,
        tracking_uri,
        data_cfg,
        cfg,
        out_dir,
        Path(workdir) / "evaluate" / "reference",
        held_out.undesirable_path,
        log=get_run_logger(),
        split=split,
        gpu_memory_gib=gpu_memory_gib,
    )
