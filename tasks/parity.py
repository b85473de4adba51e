"""Parity: does each GGUF still do the task the PyTorch model was gated on?

Every exported GGUF answers the same held-out examples the evaluation stage used, through llama.cpp
(llama-cpp-python), with the same prompt token ids (the trained tokenizer's chat template), the same stop
tokens (eos and generation_config's eos ids), greedy decoding and the same token budget; answers are decoded
by the same tokenizer and scored by `tasks/metrics.score_answers`, like the evaluation stage's. Measuring is
cached; which GGUFs are within `export.max_drop` of the PyTorch model is decided uncached, like the gate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import DataConfig, EvalConfig, ExportConfig
from tasks.examples import Example, read_examples
from tasks.export import ExportResult
from tasks.llama_cpp_tools import load_gguf
from tasks.metrics import required_keys, score_answers


class GgufScores(BaseModel):
    gguf_type: str
    scores: dict[str, float]  # split means, named as in tasks/metrics.py


class ParityReport(BaseModel):
    n_samples: int
    ggufs: list[GgufScores]  # in the order of `export.gguf_types`
    samples_path: Path  # JSONL: expected answer and each GGUF's answer per held-out example


class ParityVerdict(BaseModel):
    gguf_type: str
    passed: bool
    failures: list[str]  # one line per metric over its limit


def measure_parity(exported: ExportResult, eval_examples: Path, data_cfg: DataConfig, cfg: EvalConfig,
                   out_dir: Path) -> ParityReport:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.merged_dir)
    examples = list(read_examples(eval_examples))[: cfg.max_samples]
    prompts = [tokenizer(tokenizer.apply_chat_template([m.model_dump() for m in ex.prompt], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for ex in examples]
    stop_ids = stop_token_ids(exported.merged_dir, tokenizer)
    references = [ex.answer for ex in examples]
    required = required_keys(references) if data_cfg.output_format == "json" else []

    results, answers_by_type = [], {}
    for gguf in exported.ggufs:
        generated = greedy_answers(gguf.path, prompts, stop_ids, cfg.max_new_tokens)
        answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in generated]
        scores, _ = score_answers(answers, references, [stopped for _, stopped in generated],
                                  data_cfg.output_format, required)
        results.append(GgufScores(gguf_type=gguf.type, scores=scores))
        answers_by_type[gguf.type] = answers

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    _write_samples(samples_path, examples, answers_by_type)
    return ParityReport(n_samples=len(examples), ggufs=results, samples_path=samples_path)


def stop_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """The tokens the PyTorch evaluation stops on: the tokenizer's eos and generation_config.json's eos ids."""
    config_file = model_dir / "generation_config.json"
    configured = json.loads(config_file.read_text()).get("eos_token_id") if config_file.exists() else None
    configured = configured if isinstance(configured, list) else [configured]
    return {t for t in (tokenizer.eos_token_id, *configured) if t is not None}


def greedy_answers(gguf_path: Path, prompts: list[list[int]], stop_ids: set[int],
                   max_new_tokens: int) -> list[tuple[list[int], bool]]:
    """(answer token ids, ended by a stop token) per prompt: greedy, at most `max_new_tokens` tokens."""
    n_ctx = max(len(p) for p in prompts) + max_new_tokens
    llm = load_gguf(gguf_path, n_ctx=n_ctx, n_threads=os.cpu_count())
    try:
        results = []
        for prompt in prompts:
            answer: list[int] = []
            stopped = False
            # temp=0 samples greedily; consecutive prompts reuse the KV cache of their shared prefix.
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if token in stop_ids:
                    stopped = True
                    break
                answer.append(token)
                if len(answer) == max_new_tokens:
                    break
            results.append((answer, stopped))
        return results
    finally:
        llm.close()


def parity_verdicts(report: ParityReport, reference: dict[str, float | None],
                    cfg: ExportConfig) -> list[ParityVerdict]:
    """Each GGUF against the PyTorch model's scores: a metric may drop by at most its `max_drop` limit."""
    verdicts = []
    for gguf in report.ggufs:
        failures = []
        for metric, limit in cfg.drop_limits(gguf.gguf_type).items():
            if reference.get(metric) is None or metric not in gguf.scores:
                continue  # e.g. valid_json_rate on a free-text task
            drop = reference[metric] - gguf.scores[metric]
            if drop > limit + 1e-9:  # float slack: 0.75 - 0.73 must pass a 0.02 limit
                failures.append(f"{metric}: {gguf.scores[metric]:.4f} vs PyTorch {reference[metric]:.4f} "
                                f"(drop {drop:.4f} > {limit})")
        verdicts.append(ParityVerdict(gguf_type=gguf.gguf_type, passed=not failures, failures=failures))
    return verdicts


def _write_samples(path: Path, examples: list[Example], answers_by_type: dict[str, list[str]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i, example in enumerate(examples):
            row = {"id": example.id, "expected": example.answer,
                   **{gguf_type: answers[i] for gguf_type, answers in answers_by_type.items()}}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


@task(name="parity", cache_policy=STAGE_CACHE, persist_result=True)
def parity(exported: ExportResult, eval_examples: Path, data_cfg: DataConfig, cfg: EvalConfig,
           workdir: Path) -> ParityReport:
    out_dir = stage_dir(workdir, "parity", exported, eval_examples, data_cfg, cfg)
    return measure_parity(exported, eval_examples, data_cfg, cfg, out_dir)
