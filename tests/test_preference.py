"""Preference tuning: the KTO and DPO losses against TRL's trainers, and a KTO run on the CPU."""

from __future__ import annotations

import pytest
import torch

from tunepipe.tasks.data.format import IGNORE
from tunepipe.tasks.train.preference import dpo_loss, kl_rows, kto_loss, phase_rows, reference_logps, sequence_logps


def _policy_and_reference(tiny_model):
    """The tiny model twice, the policy moved off the reference so the log-ratios are not zero."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return policy.eval(), reference.eval()


def _rows(batch: dict, tokenizer) -> list[dict]:
    """TRL's collated sequences as tunepipe's formatted rows: ids without padding, labels on the completion."""
    rows = []
    for i, (ids, mask, completion) in enumerate(
        zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ):
        kept = mask.bool()
        ids, completion = ids[kept].tolist(), completion[kept].tolist()
        rows.append({"id": str(i), "input_ids": ids, "labels": [t if c else IGNORE for t, c in zip(ids, completion)]})
    return rows


def _stepper(model, pad_id: int):
    from tunepipe.tasks.train.environment import Rank
    from tunepipe.tasks.train.stepper import Stepper

    return Stepper(
        model=model,
        scaler=None,
        device=torch.device("cpu"),
        precision="fp32",
        backend="hf",
        packing=True,
        row_tokens=None,
        head_chunk=64,
        pad_id=pad_id,
        max_oom_retries=0,
        rank=Rank(),
    )


def _trainer(kind: str, tiny_model, tmp_path, rows: list[dict], **args):
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy, reference = _policy_and_reference(tiny_model)
    config = getattr(trl, f"{kind}Config")(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        precompute_ref_log_probs=True,
        report_to=[],
        use_cpu=True,
        beta=0.3,
        **args,
    )
    trainer = getattr(trl, f"{kind}Trainer")(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return trainer, policy, tokenizer


def test_dpo_loss_matches_trl(tiny_model, tmp_path) -> None:
    pairs = [
        {"prompt": "Extract: <b>Kettle</b>", "chosen": ' {"name":"Kettle"}', "rejected": " <b>Kettle</b>"},
        {"prompt": "Extract: <i>Lamp</i>", "chosen": ' {"name":"Lamp"}', "rejected": " It is a lamp, I think."},
    ]
    trainer, policy, tokenizer = _trainer("DPO", tiny_model, tmp_path, pairs)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer.compute_loss(policy, batch)
        logps = sequence_logps(_stepper(policy, tokenizer.pad_token_id), _rows(batch, tokenizer))
    chosen, rejected = logps.split(len(pairs))
    loss, metrics = dpo_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.3)
    assert abs(expected.item() - 0.6931) > 1e-3  # the policy differs from the reference: not the trivial log 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    logged = trainer._metrics["eval"]  # the policy is in eval mode: no dropout
    assert metrics["rewards_margin"] == pytest.approx(logged["rewards/margins"][-1], abs=1e-5)


def test_kto_loss_matches_trl(tiny_model, tmp_path) -> None:
    rows = [
        {"prompt": "Extract: <b>Kettle</b>", "completion": ' {"name":"Kettle"}', "label": True},
        {"prompt": "Extract: <i>Lamp</i>", "completion": " <i>Lamp</i>", "label": False},
        {"prompt": "Extract: <u>Rug</u>", "completion": ' {"name":"Rug"}', "label": True},
        {"prompt": "Extract: <s>Tent</s>", "completion": " I think it is a tent, a tent.", "label": False},
    ]
    trainer, policy, tokenizer = _trainer(
        "KTO", tiny_model, tmp_path, rows, desirable_weight=1.0, undesirable_weight=1.5
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer.compute_loss(policy, batch)
        stepper = _stepper(policy, tokenizer.pad_token_id)
        ours = _rows(batch, tokenizer)
        kl = sequence_logps(
            stepper, _rows({k.removeprefix("KL_"): v for k, v in batch.items() if "KL_" in k}, tokenizer)
        )
        # tunepipe builds the same mismatched pairs itself: row i's prompt with row i-1's answer.
        assert [r["input_ids"] for r in kl_rows(ours)] == [
            r["input_ids"] for r in _rows({k.removeprefix("KL_"): v for k, v in batch.items() if "KL_" in k}, tokenizer)
        ]
        loss, metrics = kto_loss(
            sequence_logps(stepper, ours),
            batch["ref_logps"],
            batch["label"].bool(),
            kl,
            batch["ref_KL_logps"],
            0.3,
            1.0,
            1.5,
        )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    logged = trainer._metrics["eval"]  # the policy is in eval mode: no dropout
    # The KL term is a difference of whole sequences' log-probabilities (-196 to -335 here, an fp32 ulp
    # of 1.5e-5 to 3e-5): summed in another order it moves by about an ulp (2.3e-5 seen on an AMD EPYC).
    assert metrics["kl"] == pytest.approx(logged["kl"][-1], abs=1e-4)
    assert metrics["rewards_chosen"] == pytest.approx(logged["rewards/chosen"][-1], abs=1e-5)


def test_phase_rows_split_the_data_by_objective() -> None:
    rows = [
        {"id": "a", "input_ids": [1, 2], "labels": [IGNORE, 2]},
        {"id": "b", "input_ids": [1, 3], "labels": [IGNORE, 3], "kind": "desirable"},
        {"id": "c", "input_ids": [1, 4], "labels": [IGNORE, 4], "kind": "undesirable"},
        {
            "id": "d",
            "input_ids": [1, 3],
            "labels": [IGNORE, 3],
            "kind": "pair",
            "rejected_input_ids": [1, 4],
            "rejected_labels": [IGNORE, 4],
        },
    ]
    sft, kto = phase_rows(rows, "sft+kto")
    assert [r["id"] for r in sft] == ["a", "b"] and [r["id"] for r in kto] == ["b", "c"]  # "d" repeats "b"
    assert [r["id"] for r in phase_rows(rows, "dpo")[1]] == ["d"]
    with pytest.raises(ValueError, match="train.objective=kto needs rated rows"):
        phase_rows(rows[:1], "kto")


# --- KTO in the training worker, on the CPU ------------------------------------------------------------------

SFT_STEPS, KTO_STEPS, SAVE_STEPS = 8, 6, 4
N_TRAIN, N_EVAL = 64, 16  # pages: few, so the test stays cheap on a busy 2-core machine
SYSTEM = "Extract the product as JSON."


@pytest.fixture(scope="module")
def rated(tmp_path_factory, tiny_model, demo_data):
    """The demo's pages with good (JSON) answers, and for half of them the answer users rated bad: the page's
    HTML echoed back. Held-out pages carry rated-bad answers only."""
    import json

    from tunepipe.tasks.chat.examples import read_examples, write_jsonl
    from tunepipe.tasks.data.containers import DataSource
    from tunepipe.tasks.data.files import read_file
    from tunepipe.tasks.data.format import format_dataset
    from tunepipe.tasks.data.shapes import Normaliser
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import ModelConfig

    work = tmp_path_factory.mktemp("rated")
    train, eval_ = (
        [json.loads(line) for line in path.read_text().splitlines()][:n]
        for path, n in zip(demo_data, (N_TRAIN, N_EVAL))
    )
    good = lambda row: json.dumps(row["output"], separators=(",", ":"))  # noqa: E731
    files = {
        "train": [{"prompt": r["input"], "completion": good(r), "label": True} for r in train]
        + [{"prompt": r["input"], "completion": r["input"], "label": False} for r in train[::2]],
        "eval": [{"prompt": r["input"], "completion": good(r)} for r in eval_],
        "eval_bad": [{"prompt": r["input"], "completion": r["input"], "label": False} for r in eval_],
    }
    examples = {}
    for name, rows in files.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        examples[name] = read_file(DataSource(path=work / f"{name}.jsonl"), Normaliser(None, SYSTEM)).examples
    write_jsonl(work / "train_good.jsonl", [e for e in examples["train"] if e.kind != "undesirable"])
    write_jsonl(work / "train_bad.jsonl", [e for e in examples["train"] if e.kind == "undesirable"])
    write_jsonl(work / "eval_good.jsonl", examples["eval"])
    write_jsonl(work / "eval_bad_ex.jsonl", examples["eval_bad"])
    model_cfg = ModelConfig(base=str(tiny_model), max_seq_length=384)  # an echoed page is twice as long
    data = format_dataset(
        work / "train_good.jsonl",
        work / "eval_good.jsonl",
        resolve_base_model(model_cfg),
        model_cfg,
        work / "formatted",
        undesirable=(work / "train_bad.jsonl", work / "eval_bad_ex.jsonl"),
    )
    assert len(list(read_examples(work / "eval_bad_ex.jsonl"))) == data.eval_undesirable.n_rows
    return data, model_cfg


def _train(rated, out_dir, **train):
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.config import LoraConfig, TrainConfig
    from tunepipe.tasks.runtime.worker import run_worker
    from tunepipe.tasks.train.results import TrainResult
    from tunepipe.tasks.train.task import TrainRequest

    data, model_cfg = rated
    # The demo's recipe for the tiny model (every weight, constant rate): it cannot learn through an adapter.
    cfg = TrainConfig(
        mode="full",
        max_steps=SFT_STEPS,
        batch_size=8,
        learning_rate=3e-3,
        lr_scheduler="constant",
        warmup_steps=2,
        save_steps=SAVE_STEPS,
        gradient_checkpointing=False,
        seed=1,
        **train,
    )
    request = TrainRequest(
        data=data.train,
        base=resolve_base_model(model_cfg),
        model_cfg=model_cfg,
        lora=LoraConfig(),
        cfg=cfg,
        out_dir=out_dir,
    )
    return lambda on_event=None: run_worker(
        "tunepipe.tasks.train.loop:train_model", request, TrainResult, out_dir, on_event=on_event
    )


def _losses(result, rated) -> tuple[float, float]:
    """(held-out good answers' loss, held-out rated-bad answers' loss) of a trained model."""
    import json

    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.evaluate.worker import answer_losses, mean_answer_loss

    data, _ = rated
    model = AutoModelForCausalLM.from_pretrained(result.adapter_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return tuple(
            mean_answer_loss(
                answer_losses(model, [json.loads(line) for line in split.path.read_text().splitlines()], 16, 0)
            )
            for split in (data.eval, data.eval_undesirable)
        )


@pytest.mark.slow
def test_kto_makes_rated_bad_answers_less_likely_than_sft_alone_and_resumes_exactly(rated, tmp_path) -> None:
    """SFT alone against SFT + KTO on the same pages; the KTO run is killed in its KTO phase and resumed."""
    import os
    import signal

    from tunepipe.tasks.runtime.worker import WorkerFailed

    sft = _train(rated, tmp_path / "sft")()
    kto_run = _train(
        rated,
        tmp_path / "kto",
        objective="sft+kto",
        preference={"max_steps": KTO_STEPS, "learning_rate": 5e-4, "batch_size": 8},
    )
    killed_at, logged = SFT_STEPS + SAVE_STEPS + 1, {}

    def kill_in_kto_phase(event):
        if event["event"] == "started":
            logged["pid"] = event["pid"]
        elif event["event"] == "step":
            logged[event["step"]] = event["loss"]
            if event["step"] == killed_at:
                os.kill(logged["pid"], signal.SIGKILL)

    with pytest.raises(WorkerFailed, match="killed by SIGKILL"):
        kto_run(kill_in_kto_phase)
    cache = tmp_path / "kto" / "reference_logps.json"
    written = cache.stat().st_mtime_ns
    kto = kto_run()
    # Resumed from the KTO phase's checkpoint with the cached reference log-probabilities, to the same losses.
    assert kto.resumed_from_step == SFT_STEPS + SAVE_STEPS and cache.stat().st_mtime_ns == written
    assert kto.loss_history[killed_at - 1].loss == pytest.approx(logged[killed_at], abs=1e-6)
    assert [p.phase for p in kto.loss_history] == ["sft"] * SFT_STEPS + ["kto"] * KTO_STEPS
    assert kto.steps == SFT_STEPS + KTO_STEPS
    last = kto.loss_history[-1]
    assert last.kl is not None and last.rewards_margin > 0  # desirable rewards above undesirable ones

    good_sft, bad_sft = _losses(sft, rated)
    good_kto, bad_kto = _losses(kto, rated)
    print(
        f"held-out token loss, good / rated-bad answers: sft {good_sft:.3f} / {bad_sft:.3f}, "
        f"sft+kto {good_kto:.3f} / {bad_kto:.3f}"
    )
    # On held-out pages, the rated-bad answer is much less likely after KTO (loss per token up), while the good
    # answers stay about as likely.
    assert bad_kto > bad_sft + 0.5, (bad_sft, bad_kto)
    assert good_kto < good_sft + 0.25, (good_sft, good_kto)


def test_the_base_is_the_reference_with_the_adapters_disabled(tiny_model, tmp_path) -> None:
    """`kto`/`dpo` on LoRA: the reference log-probabilities come from the same model with its adapters off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = [
        {"id": "a", "input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]},
        {"id": "b", "input_ids": [9, 10, 11], "labels": [IGNORE, 10, 11]},
    ]
    with torch.no_grad():
        expected = sequence_logps(_stepper(base, 0), rows).tolist()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    stepper = _stepper(model, 0)
    with torch.no_grad():
        assert sequence_logps(stepper, rows).tolist() != pytest.approx(expected, abs=1e-2)  # the adapter matters
    cached = tmp_path / "reference_logps.json"
    assert list(reference_logps(stepper, rows, cached, from_base=True, batch_size=1).values()) == pytest.approx(
        expected, rel=1e-6
    )
    assert model.training  # back to training mode
    cached.write_text('{"a": 1.0, "b": 2.0}')  # what a killed run kept is reused, not recomputed
    assert reference_logps(stepper, rows, cached, from_base=True, batch_size=1) == {"a": 1.0, "b": 2.0}
