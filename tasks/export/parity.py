"""Parity through the served path: does each GGUF still do the task, answering as Ollama will serve it?

Each exported GGUF first passes a vocabulary check: llama.cpp, with the GGUF's own vocabulary, must give the
trained tokenizer's token ids for rendered training conversations (a GGUF whose converter took the wrong
tokenizer path fails here, naming the first tokens that differ). Then it answers the held-out examples the
evaluation stage used the way Ollama's /api/chat will: the Modelfile's TEMPLATE and SYSTEM render the prompt
text (Go's own text/template, `tasks/integrations/ollama/render.py`), llama.cpp tokenizes that text with the GGUF's
vocabulary (special tokens parsed, BOS as the vocabulary asks), decoding is greedy, and generation ends at an
end-of-generation token or the first Modelfile stop string, within the evaluation's token budget. Answers are
scored by `tunepipe.tasks.chat.metrics.score_answers`, like the evaluation stage's. Measuring is cached; which GGUFs are
within `export.max_drop` of the PyTorch model is decided uncached, like the gate.

After QLoRA the two sides differ by construction: the evaluation scored the 4-bit base with the adapter beside it
(what training optimised), the GGUF is the adapter merged into the 16-bit base, then quantized. The drop of each
GGUF against the evaluation's scores is what that difference (and the GGUF's own quantization) costs the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import task

from tunepipe.tasks.chat.examples import Example, read_examples
from tunepipe.tasks.chat.generation import render_prompt
from tunepipe.tasks.chat.metrics import required_keys, score_answers
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.export.results import ExportResult, GgufScores, ParityReport, ParityVerdict
from tunepipe.tasks.integrations.llama_cpp import load_gguf
from tunepipe.tasks.integrations.ollama.modelfile import client_messages, modelfile_spec
from tunepipe.tasks.integrations.ollama.render import render_served_prompt
from tunepipe.tasks.model.gguf_tokenizer import VocabularyMismatch, compare_token_ids
from tunepipe.tasks.runtime.caching import StageCache, stage_dir
from tunepipe.tasks.runtime.config import DataConfig, EvalConfig, ExportConfig, OllamaConfig
from tunepipe.tasks.runtime.progress import Progress

# Training conversations whose token ids the vocabulary check compares (the first ones of the clean split).
VOCAB_CHECK_CONVERSATIONS = 32
# What of the `ollama` section parity depends on: the Modelfile's TEMPLATE and SYSTEM, which render the served
# prompt. Where Ollama is, how long it may take and the smoke test do not change an answer, nor the key.
SERVED_PROMPT_FIELDS = ("template", "system")
PARITY_CACHE = StageCache(fields={"ollama_cfg": SERVED_PROMPT_FIELDS})


def measure_parity(
    exported: ExportResult,
    eval_examples: Path,
    train_examples: Path,
    data_cfg: DataConfig,
    cfg: EvalConfig,
    ollama_cfg: OllamaConfig,
    chat: ChatContext,
    out_dir: Path,
) -> ParityReport:
    """Served-path scores of each GGUF; prompts render with training's `chat` context, as training's did."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.merged_dir)
    training_texts = [
        chat.render(tokenizer, [m.model_dump() for m in ex.messages], False)
        for _, ex in zip(range(VOCAB_CHECK_CONVERSATIONS), read_examples(train_examples))
    ]
    examples = list(read_examples(eval_examples))[: cfg.max_samples]
    trained_prompts = [render_prompt(tokenizer, [m.model_dump() for m in ex.prompt], chat) for ex in examples]
    references = [ex.answer for ex in examples]
    required = required_keys(references) if data_cfg.output_format == "json" else []

    results, answers_by_type, served_texts = [], {}, []
    for gguf in exported.ggufs:
        try:
            compare_token_ids(tokenizer, gguf.path, training_texts, f"the {gguf.type} GGUF")
        except VocabularyMismatch as exc:
            results.append(GgufScores(gguf_type=gguf.type, scores={}, vocabulary_problem=str(exc)))
            continue
        # The Modelfile the serving stage writes for this GGUF: same template, system prompt and stops.
        spec = modelfile_spec(
            gguf.path,
            exported.merged_dir,
            **ollama_cfg.modelfile_settings(),
            trained_system=data_cfg.system_prompt,
            chat=chat,
        )
        served_texts = [
            render_served_prompt(spec.template, client_messages(ex.prompt, spec.system), spec.system) for ex in examples
        ]
        generated, served_ids = served_answers(
            gguf.path, served_texts, spec.stops, cfg.max_new_tokens, f"parity {gguf.type}"
        )
        answers = [answer.strip() for answer, _ in generated]
        scores, _ = score_answers(
            answers, references, [stopped for _, stopped in generated], data_cfg.output_format, required
        )
        mismatches = sum(ids != trained for ids, trained in zip(served_ids, trained_prompts))
        results.append(GgufScores(gguf_type=gguf.type, scores=scores, prompt_mismatches=mismatches))
        answers_by_type[gguf.type] = answers

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    _write_samples(samples_path, examples, served_texts, answers_by_type)
    return ParityReport(n_samples=len(examples), ggufs=results, samples_path=samples_path)


def served_answers(
    gguf_path: Path, prompts: list[str], stops: list[str], max_new_tokens: int, what: str
) -> tuple[list[tuple[str, bool]], list[list[int]]]:
    """Per prompt text, (answer, ended by a stop) as Ollama serves it; and the prompt's token ids.

    Greedy, at most `max_new_tokens` tokens; an end-of-generation token of the GGUF's vocabulary or the first
    stop string ends the answer (the stop string is not part of it).
    """
    import llama_cpp

    vocab_only = load_gguf(gguf_path, vocab_only=True)
    try:
        # Ollama tokenizes the rendered prompt with special tokens parsed and the vocabulary's own BOS rule.
        ids = [vocab_only.tokenize(text.encode(), add_bos=True, special=True) for text in prompts]
    finally:
        vocab_only.close()
    # Half the cores, for prompts and generation alike: llama.cpp's threads spin while they wait for each other,
    # so one more thread than the cores free (a stage's worker or another job beside it) is ruinous.
    threads = max((os.cpu_count() or 2) // 2, 1)
    llm = load_gguf(gguf_path, n_ctx=max(map(len, ids)) + max_new_tokens, n_threads=threads, n_threads_batch=threads)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        results = []
        progress = Progress(what, len(ids), "prompts")
        for prompt in ids:
            answer: list[int] = []
            text, stopped = "", False
            # temp=0 samples greedily; consecutive prompts reuse the KV cache of their shared prefix.
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stopped = True
                    break
                answer.append(token)
                text = llm.detokenize(answer, special=True).decode("utf-8", "replace")
                cut = min((text.index(stop) for stop in stops if stop in text), default=None)
                if cut is not None:
                    text, stopped = text[:cut], True
                    break
                if len(answer) == max_new_tokens:
                    break
            results.append((text, stopped))
            progress.advance()
        return results, ids
    finally:
        llm.close()


def parity_verdicts(report: ParityReport, reference: dict[str, float | None], cfg: ExportConfig) -> list[ParityVerdict]:
    """Each GGUF against the PyTorch model's scores: a metric may drop by at most its `max_drop` limit."""
    verdicts = []
    for gguf in report.ggufs:
        failures = [f"vocabulary check: {gguf.vocabulary_problem}"] if gguf.vocabulary_problem else []
        for metric, limit in cfg.drop_limits(gguf.gguf_type).items():
            if reference.get(metric) is None or metric not in gguf.scores:
                continue  # e.g. valid_json_rate on a free-text task
            drop = reference[metric] - gguf.scores[metric]
            if drop > limit + 1e-9:  # float slack: 0.75 - 0.73 must pass a 0.02 limit
                failures.append(
                    f"{metric}: {gguf.scores[metric]:.4f} vs PyTorch {reference[metric]:.4f} "
                    f"(drop {drop:.4f} > {limit})"
                )
        verdicts.append(ParityVerdict(gguf_type=gguf.gguf_type, passed=not failures, failures=failures))
    return verdicts


def _write_samples(
    path: Path, examples: list[Example], served_prompts: list[str], answers_by_type: dict[str, list[str]]
) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i, example in enumerate(examples):
            row = {
                "id": example.id,
                "served_prompt": served_prompts[i] if served_prompts else None,
                "expected": example.answer,
                **{gguf_type: answers[i] for gguf_type, answers in answers_by_type.items()},
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


@task(name="parity", cache_policy=PARITY_CACHE, persist_result=True)
def parity(
    exported: ExportResult,
    eval_examples: Path,
    train_examples: Path,
    data_cfg: DataConfig,
    cfg: EvalConfig,
    ollama_cfg: OllamaConfig,
    chat: ChatContext,
    workdir: Path,
) -> ParityReport:
    out_dir = stage_dir(
        workdir,
        "parity",
        exported,
        eval_examples,
        train_examples,
        data_cfg,
        cfg,
        ollama_cfg.model_dump(mode="json", include=set(SERVED_PROMPT_FIELDS)),
        chat,
    )
    return measure_parity(exported, eval_examples, train_examples, data_cfg, cfg, ollama_cfg, chat, out_dir)
