"""Score the candidate, the base model and the champion on the same held-out examples with the same metrics.

Either held-out split: each attempt of the retrain loop is scored on validation, which the loop's choices read;
the final candidate once on test, which only the gate, the champion comparison, the headline and parity read.
The probes are asked on test only: they are shown in the report, and no choice reads them.

Each model answers every held-out prompt and every probe greedily in a worker process of its own
(`tunepipe.tasks.evaluate.worker`: one model at a time, on the GPU in bf16 where there is one, in 4-bit after
QLoRA), which also measures its eval loss: the mean token loss on the held-out assistant tokens, computed exactly
as in training. Its answers are scored by `tunepipe.tasks.chat.metrics` (valid JSON, exact match, per-field
accuracy, key F1, required keys from the training answers; ROUGE-L and chrF for free text; stop rate).
samples.jsonl keeps every score per example, each example's own eval loss (the mean over its answer tokens) and
its number of answer tokens, so the gate's intervals of eval_loss are token-weighted as the split's value is.

Held-out rated-bad answers, when the data has them, are scored apart: `undesirable_close_rate`,
how often a model's own answer to such a prompt is close to the answer users rated bad (`metrics.close_to`:
the same JSON object, or text with a similarity ratio of at least 0.9), and `undesirable_loss`, the mean token
loss of those bad answers (higher: the model finds them less likely). They are reported and tracked; the gate
rules do not name them, so the gate decides as before.

The candidate changes with every training; the base model and the champion do not. Their raw outputs
(answers, stop flags, eval loss, probe answers) are kept in `evaluate/reference/` under a key of the
model's identity (base fingerprint; champion name, version and run), the eval data, the eval settings and
the code of this stage and its worker, so a retrain, or a run against the same champion, generates only the
candidate's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from tunepipe.tasks.chat.examples import Message, read_examples
from tunepipe.tasks.chat.metrics import close_to, required_keys, score_answers
from tunepipe.tasks.data.results import CheckedData, FormattedData, HeldOutSplit
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores
from tunepipe.tasks.evaluate.worker import GenerationRequest, GenerationResult, ModelOutputs, ModelToScore
from tunepipe.tasks.integrations.model_registry import ChampionRef, download_champion
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.caching import StageCache, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import DataConfig, EvalConfig
from tunepipe.tasks.runtime.gpu_slots import gpu_slots
from tunepipe.tasks.runtime.worker import EVALUATE_WORKER, prestart_worker, run_worker
from tunepipe.tasks.train.results import TrainResult

# The retention stage's worker (tasks/evaluate/retention.py), named here so this stage can start it early.
RETENTION_WORKER = "tunepipe.tasks.evaluate.retention:answer_general_prompts"


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
        _file_hash(Path(__file__).with_name("worker.py")),
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
    cache_policy=StageCache(
        sources=("tunepipe.tasks.evaluate.worker", "tunepipe.tasks.chat.generation", "tunepipe.tasks.chat.metrics")
    ),
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
