"""Score the candidate and the base model on the same held-out split with the same metrics.

Generation metrics (greedy, on the prompts of held-out conversations): valid-JSON rate, exact match and
the share of answers that ended with an end-of-turn token rather than at the length limit (a model that
never stops is broken however good its first tokens are). Eval loss is the mean token loss on the
held-out assistant tokens, computed exactly as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.base_model import BaseModelRef
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import DataConfig, EvalConfig
from tasks.examples import Example, read_examples
from tasks.format_data import IGNORE, FormattedData
from tasks.metrics import score_answers
from tasks.train import TrainResult, load_trained_model


class ModelScores(BaseModel):
    name: str  # "candidate" | "base" | "champion"
    version: str | None = None  # the champion's registry version
    metrics: dict[str, float]  # eval_loss, stop_rate and the task metrics of tasks/metrics.py


class EvalReport(BaseModel):
    n_samples: int
    candidate: ModelScores
    base: ModelScores
    champion: ModelScores | None = None
    samples_path: Path  # JSONL per held-out example: id, source, prompt, expected, per model {answer, stopped, scores}
    probes_path: Path  # JSONL per probe: prompt and the answer of each model


def evaluate_adapter(
    data: FormattedData, eval_examples: Path, trained: TrainResult, base: BaseModelRef, data_cfg: DataConfig,
    cfg: EvalConfig, out_dir: Path,
) -> EvalReport:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    model = load_trained_model(trained, base).eval()
    # A fully fine-tuned model has no adapter to switch off: the base is a model of its own.
    base_model = model if trained.kind == "lora" else AutoModelForCausalLM.from_pretrained(
        base.name_or_path, revision=base.revision).eval()
    base_only = model.disable_adapter() if trained.kind == "lora" else contextlib.nullcontext()
    examples = list(read_examples(eval_examples))[: cfg.max_samples]
    rows = data.eval.rows()

    with torch.inference_mode():
        candidate_answers, candidate_stopped = _generate(model, tokenizer, examples, cfg, "candidate")
        candidate_loss = _mean_loss(model, rows, cfg.batch_size, tokenizer.pad_token_id)
        with base_only:
            base_answers, base_stopped = _generate(base_model, tokenizer, examples, cfg, "base")
            base_loss = _mean_loss(base_model, rows, cfg.batch_size, tokenizer.pad_token_id)

    references = [example.answer for example in examples]
    scored = {
        "candidate": (candidate_answers, candidate_stopped, candidate_loss,
                      *score_answers(candidate_answers, references, candidate_stopped, data_cfg.output_format)),
        "base": (base_answers, base_stopped, base_loss,
                 *score_answers(base_answers, references, base_stopped, data_cfg.output_format)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    with samples_path.open("w", encoding="utf-8") as out:
        for i, example in enumerate(examples):
            row = {"id": example.id, "source": f"{example.source}:{example.line}",
                   "prompt": example.prompt[-1].content, "expected": example.answer}
            for who, (answers, stopped, _, _, per_example) in scored.items():
                row[who] = {"answer": answers[i], "stopped": stopped[i], "scores": per_example[i]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    probes_path = out_dir / "probes.jsonl"
    probes_path.write_text("")
    candidate, base_scores = (
        ModelScores(name=who, metrics={"eval_loss": loss, **means})
        for who, (_, _, loss, means, _) in scored.items()
    )
    return EvalReport(n_samples=len(examples), candidate=candidate, base=base_scores, samples_path=samples_path,
                      probes_path=probes_path)


def _generate(model, tokenizer, examples: list[Example], cfg: EvalConfig, who: str) -> tuple[list[str], list[bool]]:
    """Greedy answers, batched with left padding, and whether each ended with an end-of-turn token."""
    from tqdm.auto import tqdm

    stop_ids = _stop_token_ids(model, tokenizer)
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    answers, stopped = [], []
    for start in tqdm(range(0, len(examples), cfg.batch_size), desc=f"evaluate: {who} answers", unit="batch"):
        batch = examples[start : start + cfg.batch_size]
        prompts = [
            tokenizer.apply_chat_template([m.model_dump() for m in ex.prompt], tokenize=False,
                                          add_generation_prompt=True)
            for ex in batch
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            ended = next((i for i, token in enumerate(row) if token in stop_ids), None)
            stopped.append(ended is not None)
            answers.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    return answers, stopped


def _stop_token_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(t for t in configured if t is not None)})


def _mean_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over every assistant token of the split."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        input_ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in batch])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += losses.item()
        count += int((targets != IGNORE).sum())
    return total / count


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate(
    data: FormattedData, eval_examples: Path, trained: TrainResult, base: BaseModelRef, data_cfg: DataConfig,
    cfg: EvalConfig, workdir: Path,
) -> EvalReport:
    out_dir = stage_dir(workdir, "evaluate", data, trained, base, data_cfg, cfg)
    return evaluate_adapter(data, eval_examples, trained, base, data_cfg, cfg, out_dir)
