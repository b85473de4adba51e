"""Evaluation: batched greedy answers equal one-at-a-time ones; the champion is loaded from a real MLflow
registry, scored beside candidate and base, and its outputs are reused until the champion changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stage_results

from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.config import DataConfig, EvalConfig, ModelConfig

PROMPTS = [f"<div><h2>Product: Kettle {'x' * (7 * i)}</h2><p>Price: ${i}</p></div>" for i in range(7)]


@pytest.fixture(scope="module")
def noisy_model(tiny_model: Path):
    """The tiny model with random dense weights: its greedy answers vary from prompt to prompt, where the
    tiny model's own answers are one repeated token, which would hide a misaligned row or position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.normal_(0, 0.3)
    return model, tokenizer


def _one_at_a_time(model, tokenizer, conversation, max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    import torch

    from tunepipe.tasks.chat.generation import render_prompt

    ids = torch.tensor([render_prompt(tokenizer, conversation)])
    output = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    return output[0, ids.shape[1] :].tolist()


@pytest.mark.slow  # generates with a trained model
def test_batched_answers_equal_one_at_a_time_greedy_answers(noisy_model):
    import torch

    from tunepipe.tasks.chat.generation import greedy_answers, stop_token_ids

    model, tokenizer = noisy_model
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    with torch.inference_mode():
        # Make a token that some answers produce a stop token, so early stops are part of the comparison.
        first = _one_at_a_time(model, tokenizer, conversations[0], 24, stop_token_ids(model, tokenizer))
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, first[5]]
        stop_ids = stop_token_ids(model, tokenizer)
        singles = [_one_at_a_time(model, tokenizer, c, 24, stop_ids) for c in conversations]
        # 7 prompts of different lengths in batches of 3: left padding, and a last batch filled with copies.
        batched = greedy_answers(model, tokenizer, conversations, max_new_tokens=24, batch_size=3)

    expected = []
    for tokens in singles:
        end = next((k for k, token in enumerate(tokens) if token in stop_ids), None)
        expected.append((tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(), end is not None))
    assert [tuple(answer) for answer in batched] == expected
    assert any(stopped for _, stopped in expected) and not all(stopped for _, stopped in expected)
    assert len({text for text, _ in expected}) == len(PROMPTS)  # varied answers: a row mix-up would show


def test_fused_norms_keep_the_models_outputs_and_leave_other_formulas_alone(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.patches.transformers import use_fused_norms

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 1:  # norm weights away from their all-ones start, so the weight's use is tested
                weight.uniform_(0.5, 1.5)
        ids = torch.tensor([[5, 900, 42, 7, 3000, 11]])
        expected = model(ids).logits
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert use_fused_norms(model) == len(norms) > 0
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)

    class GemmaStyleRMSNorm(torch.nn.Module):  # scales by 1 + weight: not what the fused kernel computes
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    gemma_style = GemmaStyleRMSNorm()
    assert use_fused_norms(gemma_style) == 0 and "forward" not in vars(gemma_style)


def test_answer_loss_matches_unpadded_per_row_loss(noisy_model):
    import torch

    from tunepipe.tasks.data.format import IGNORE
    from tunepipe.tasks.evaluate.worker import answer_losses, mean_answer_loss

    model, tokenizer = noisy_model
    rows = []
    for i, n in enumerate((9, 14, 5)):
        ids = list(range(100 + i, 100 + i + n))
        rows.append({"id": str(i), "input_ids": ids, "labels": [IGNORE] * 3 + ids[3:]})
    with torch.inference_mode():
        batched = mean_answer_loss(answer_losses(model, rows, batch_size=2, pad_id=tokenizer.pad_token_id))
        total = count = 0.0
        for row in rows:
            logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    assert batched == pytest.approx(total / count, rel=1e-5)


# --- the stage, with a champion in a real MLflow registry ----------------------------------------------------


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_data: tuple[Path, Path]):
    from tunepipe.tasks.data.format import format_dataset
    from tunepipe.tasks.data.load import load_dataset

    root = tmp_path_factory.mktemp("evaluate")
    train, eval_ = demo_data
    data_cfg = DataConfig(train=train, eval=eval_, system_prompt="Extract the product as JSON.")
    loaded = load_dataset(data_cfg, root / "loaded")
    base = resolve_base_model(ModelConfig(base=str(tiny_model)))
    formatted = format_dataset(
        loaded.train_path,
        loaded.eval_path,
        base,
        ModelConfig(base=str(tiny_model), max_seq_length=256),
        root / "formatted",
    )
    return root, data_cfg, loaded, base, formatted


def _register_champion(tracking_uri: str, name: str, model_dir: Path, artifacts: Path) -> None:
    """What promotion writes: a run holding the merged model under `model`, a version, the alias."""
    from mlflow.tracking import MlflowClient

    from tunepipe.tasks.integrations.model_registry import CHAMPION_ALIAS, MODEL_ARTIFACT

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name("promotions")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("promotions", artifact_location=artifacts.as_uri())
    )
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}", run_id=run.info.run_id)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)


def _models_generated(out_dir: Path) -> list[str]:
    request = json.loads((out_dir / "worker" / "worker-request.json").read_text())
    return [model["name"] for model in request["models"]]


@pytest.mark.slow  # evaluates in worker processes
def test_champion_is_scored_beside_candidate_and_base_and_reused_per_version(eval_inputs, tiny_model: Path):
    from tunepipe.tasks.evaluate.task import evaluate_models
    from tunepipe.tasks.integrations.model_registry import find_champion

    root, data_cfg, loaded, base, formatted = eval_inputs
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    cfg = EvalConfig(max_samples=4, max_new_tokens=8, batch_size=4, probes=["<p>Name: Lamp</p>", "hello"])
    # A fully fine-tuned candidate is a model folder of its own; the tiny model stands in for one.
    trained = stage_results.trained(tiny_model)

    def run(out: str, champion):
        return evaluate_models(
            formatted,
            loaded.eval_path,
            loaded.train_path,
            trained,
            base,
            champion,
            tracking_uri,
            data_cfg,
            cfg,
            root / out,
            root / "reference",
        )

    assert find_champion(tracking_uri, "shop") is None
    _register_champion(tracking_uri, "shop", tiny_model, root / "artifacts")
    champion = find_champion(tracking_uri, "shop")
    report = run("with-champion", champion)
    assert _models_generated(root / "with-champion") == ["candidate", "base", "champion"]
    assert report.champion is not None and report.champion.version == "1" and report.champion.name == "champion"
    assert report.n_samples == 4
    for scores in (report.candidate, report.base, report.champion):
        assert {"eval_loss", "stop_rate", "valid_json_rate", "field_accuracy", "key_f1", "required_keys_rate"} <= set(
            scores.metrics
        )
    # Champion and candidate are the same weights here: the same answers and loss, by a separate load.
    assert report.champion.metrics == pytest.approx(report.candidate.metrics)

    samples = [json.loads(line) for line in report.samples_path.read_text().splitlines()]
    assert len(samples) == 4
    assert {"id", "source", "prompt", "expected", "base", "champion", "candidate"} <= set(samples[0])
    assert {"answer", "stopped", "scores"} == set(samples[0]["champion"])
    # Each example's own eval loss and its answer tokens, for the gate's token-weighted intervals of eval_loss.
    assert all(row["answer_tokens"] > 0 and {"eval_loss"} <= set(row["candidate"]["scores"]) for row in samples)
    assert [row["champion"]["scores"]["eval_loss"] for row in samples] == pytest.approx(
        [row["candidate"]["scores"]["eval_loss"] for row in samples], rel=1e-4
    )
    probes = [json.loads(line) for line in report.probes_path.read_text().splitlines()]
    assert [p["prompt"] for p in probes] == cfg.probes
    assert all({"base", "champion", "candidate"} <= set(p) for p in probes)

    # Base and champion outputs are kept: a new candidate against the same champion generates only its own.
    again = run("same-champion", champion)
    assert _models_generated(root / "same-champion") == ["candidate"]
    assert again.champion == report.champion and again.base == report.base

    _register_champion(
        tracking_uri, "shop", tiny_model, root / "artifacts"
    )  # a new promotion moves the alias to version 2
    newer = run("new-champion", find_champion(tracking_uri, "shop"))
    assert _models_generated(root / "new-champion") == ["candidate", "champion"]
    assert newer.champion.version == "2"


@pytest.mark.slow  # evaluates in worker processes
def test_a_lora_candidate_merged_into_the_base_already_loaded_scores_as_loaded_alone(
    eval_inputs, tiny_model: Path, tmp_path: Path
):
    """The worker reads the base's weights once and merges the candidate's adapter into them after the base is
    scored: the candidate's answers and loss are those of a load of its own."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.chat.examples import read_examples
    from tunepipe.tasks.evaluate.worker import GenerationRequest, ModelToScore, generate_outputs

    _, _, loaded, _, formatted = eval_inputs
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"  # random, non-zero adapter weights: the candidate differs from the base
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        PeftLoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    ).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)
    candidate = ModelToScore(name="candidate", weights=str(tiny_model), adapter=adapter, tokenizer=str(adapter))
    base = ModelToScore(name="base", weights=str(tiny_model), tokenizer=str(adapter))
    conversations = [example.prompt for example in list(read_examples(loaded.eval_path))[:4]]

    def outputs(models: list[ModelToScore]):
        return generate_outputs(
            GenerationRequest(
                models=models,
                conversations=conversations,
                loss_rows=formatted.eval.path,
                max_new_tokens=8,
                batch_size=4,
                chat=formatted.chat,
            )
        ).outputs

    both, alone = outputs([candidate, base]), outputs([candidate])
    assert both["candidate"].answers == alone["candidate"].answers
    assert both["candidate"].eval_loss == pytest.approx(alone["candidate"].eval_loss, abs=1e-6)
    assert abs(both["candidate"].eval_loss - both["base"].eval_loss) > 0.01  # the adapter was merged


def test_each_rows_eval_loss_is_the_same_batched_with_longer_rows_as_alone(eval_inputs, tiny_model: Path):
    """Per-row losses (the gate's per-example eval_loss) do not take padding or other rows into account; their
    token-weighted mean is the split's eval_loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.evaluate.worker import answer_losses, mean_answer_loss

    *_, formatted = eval_inputs
    rows = [json.loads(line) for line in formatted.eval.path.read_text().splitlines()][:6]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        batched = answer_losses(model, rows, 6, 0)
        alone = {key: value for row in rows for key, value in answer_losses(model, [row], 1, 0).items()}
    assert set(batched) == {str(row["id"]) for row in rows}
    assert {key: count for key, (_, count) in batched.items()} == {key: count for key, (_, count) in alone.items()}
    assert [batched[key][0] for key in alone] == pytest.approx([total for total, _ in alone.values()], rel=1e-4)
    per_row = [total / count for total, count in batched.values()]
    assert len(set(per_row)) > 1 and min(per_row) < mean_answer_loss(batched) < max(per_row)


@pytest.mark.slow  # evaluates in worker processes
def test_held_out_rated_bad_answers_are_scored_apart(eval_inputs, tiny_model: Path):
    """How often a model still answers a held-out prompt close to what users rated bad, and how likely that
    bad answer is; the gate's metrics and the samples are those of the good answers alone."""
    from tunepipe.tasks.chat.examples import read_examples, write_jsonl
    from tunepipe.tasks.evaluate.task import evaluate_models

    root, data_cfg, loaded, base, _ = eval_inputs
    cfg = EvalConfig(max_samples=2, max_new_tokens=8, batch_size=4)
    trained = stage_results.trained(tiny_model)
    first = evaluate_models(
        *_formatted(root, base, loaded.eval_path, tiny_model, None),
        trained,
        base,
        None,
        "",
        data_cfg,
        cfg,
        root / "plain",
        root / "reference",
    )
    own = [json.loads(line)["candidate"]["answer"] for line in first.samples_path.read_text().splitlines()]
    # Rated bad: the model's own answer to the first page (it still gives it), something else for the second.
    examples = list(read_examples(loaded.eval_path))[:2]
    bad = [
        e.model_copy(
            update={"label": False, "messages": [*e.prompt, e.messages[-1].model_copy(update={"content": answer})]}
        )
        for e, answer in zip(examples, [own[0], "<p>HTML echoed back</p>"])
    ]
    write_jsonl(root / "bad.jsonl", bad)
    report = evaluate_models(
        *_formatted(root, base, loaded.eval_path, tiny_model, root / "bad.jsonl"),
        trained,
        base,
        None,
        "",
        data_cfg,
        cfg,
        root / "with-bad",
        root / "reference",
        root / "bad.jsonl",
    )
    assert report.n_undesirable == 2
    for scores in (report.candidate, report.base):
        assert scores.metrics["undesirable_close_rate"] == 0.5
        assert scores.metrics["undesirable_loss"] > 0
    assert {k: v for k, v in report.candidate.metrics.items() if not k.startswith("undesirable")} == (
        pytest.approx(first.candidate.metrics)
    )
    rows = [json.loads(line) for line in report.undesirable_path.read_text().splitlines()]
    assert [row["candidate"]["close"] for row in rows] == [True, False]


@pytest.mark.slow  # evaluates in worker processes
def test_the_validation_split_is_scored_on_its_own_rows_without_the_probes(eval_inputs, tiny_model: Path):
    """The retrain loop's evaluation reads validation alone: its examples, its loss rows; the probes, which no
    choice reads, are asked on test only. The base's outputs are kept per split."""
    from tunepipe.tasks.data.format import format_dataset
    from tunepipe.tasks.evaluate.task import evaluate_models

    root, data_cfg, loaded, base, _ = eval_inputs
    formatted = format_dataset(
        loaded.train_path,
        loaded.eval_path,
        base,
        ModelConfig(base=str(tiny_model), max_seq_length=256),
        root / "formatted-3",
        validation_examples=loaded.validation_path,
    )
    cfg = EvalConfig(max_samples=3, max_new_tokens=8, batch_size=4, probes=["hello"])
    trained = stage_results.trained(tiny_model)

    def run(split: str, examples: Path):
        return evaluate_models(
            formatted,
            examples,
            loaded.train_path,
            trained,
            base,
            None,
            "",
            data_cfg,
            cfg,
            root / f"split-{split}",
            root / "reference-splits",
            split=split,
        )

    validation, test = run("validation", loaded.validation_path), run("test", loaded.eval_path)
    assert (validation.split, test.split) == ("validation", "test")

    def ids(report) -> list[str]:
        return [json.loads(line)["id"] for line in report.samples_path.read_text().splitlines()]

    from tunepipe.tasks.chat.examples import read_examples

    assert ids(validation) == [e.id for e in read_examples(loaded.validation_path)][:3]
    assert ids(test) == [e.id for e in read_examples(loaded.eval_path)][:3]
    assert not set(ids(validation)) & set(ids(test))
    request = json.loads((root / "split-validation" / "worker" / "worker-request.json").read_text())
    assert request["loss_rows"] == str(formatted.validation.path) and len(request["conversations"]) == 3
    assert validation.probes_path.read_text() == "" and len(test.probes_path.read_text().splitlines()) == 1
    assert validation.candidate.metrics["eval_loss"] != pytest.approx(test.candidate.metrics["eval_loss"])
    # MLflow: test under the names dashboards know, validation beside them.
    assert set(test.scores().metrics) == {f"{m}.{k}" for m in ("candidate", "base") for k in test.candidate.metrics}
    assert set(validation.scores().metrics) == {f"validation.{name}" for name in test.scores().metrics}
    assert _models_generated(root / "split-test") == ["candidate", "base"]  # the base of another split: not reused


def _formatted(root: Path, base, eval_path: Path, tiny_model: Path, bad: Path | None):
    from tunepipe.tasks.data.format import format_dataset

    out = root / ("formatted-bad" if bad else "formatted-plain")
    formatted = format_dataset(
        eval_path, eval_path, base, ModelConfig(base=str(tiny_model), max_seq_length=256), out, undesirable=(None, bad)
    )
    return formatted, eval_path, eval_path
