"""The training worker for real, on the CPU in fp32: packing, resume after SIGKILL, two processes, OOM retry,
and the environment check. Every run trains the tiny model in a worker process, as the train stage does."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tunepipe.tasks.data.format import format_dataset
from tunepipe.tasks.data.load import load_dataset
from tunepipe.tasks.data.results import FormattedData, LoadedData
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from tunepipe.tasks.runtime.worker import WorkerFailed, run_worker
from tunepipe.tasks.train.results import HeldOut, TrainResult
from tunepipe.tasks.train.task import TrainRequest

pytestmark = pytest.mark.slow  # trains the tiny model in worker processes

STEPS, SAVE_STEPS = 8, 3


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, demo_data) -> LoadedData:
    train, eval_ = demo_data
    return load_dataset(
        DataConfig(train=train, eval=eval_, system_prompt="Extract the product as JSON."),
        tmp_path_factory.mktemp("loaded"),
    )


@pytest.fixture(scope="module")
def formatted(tmp_path_factory, tiny_model: Path, loaded) -> tuple[FormattedData, ModelConfig]:
    model_cfg = ModelConfig(base=str(tiny_model), max_seq_length=256)
    data = format_dataset(
        loaded.train_path,
        loaded.eval_path,
        resolve_base_model(model_cfg),
        model_cfg,
        tmp_path_factory.mktemp("formatted"),
    )
    return data, model_cfg


def request_for(formatted, out_dir: Path, **train) -> TrainRequest:
    data, model_cfg = formatted
    cfg = (
        dict(
            max_steps=STEPS,
            batch_size=4,
            learning_rate=5e-3,
            warmup_steps=2,
            save_steps=SAVE_STEPS,
            gradient_checkpointing=False,
            seed=3,
        )
        | train
    )
    return TrainRequest(
        data=data.train,
        base=resolve_base_model(model_cfg),
        model_cfg=model_cfg,
        lora=LoraConfig(r=4, alpha=8, target_modules="all-linear"),
        cfg=TrainConfig(**cfg),
        out_dir=out_dir,
    )


def train_in_worker(request: TrainRequest, on_event=None, devices: int = 1) -> TrainResult:
    return run_worker(
        "tunepipe.tasks.train.loop:train_model",
        request,
        TrainResult,
        request.out_dir,
        devices=devices,
        on_event=on_event,
    )


def adapter_weights(result: TrainResult) -> dict:
    from safetensors.torch import load_file

    return load_file(result.adapter_dir / "adapter_model.safetensors")


def assert_same_training(result: TrainResult, reference: TrainResult, atol: float) -> None:
    import torch

    assert [p.step for p in result.loss_history] == [p.step for p in reference.loss_history]
    assert [p.loss for p in result.loss_history] == pytest.approx([p.loss for p in reference.loss_history], abs=atol)
    ours, theirs = adapter_weights(result), adapter_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(formatted, tmp_path_factory) -> TrainResult:
    return train_in_worker(request_for(formatted, tmp_path_factory.mktemp("uninterrupted")))


@pytest.mark.parametrize("row_tokens", [None, 300])  # one packed row; rows of <= 300 tokens with padding blocks
def test_packed_loss_equals_unpacked_loss_for_every_example(formatted, tiny_model, row_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.train import batching, stepper

    data, _ = formatted
    rows = data.train.rows()[:6]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding is really exercised
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")

    def per_example(batch_rows: list[dict], packing: bool) -> list[float]:
        batch = batching.make_batch(batch_rows, packing, 0, torch.device("cpu"), row_tokens)
        total, losses, owner = stepper.token_losses(model, batch, "hf", head_chunk=7)  # many LM-head chunks
        total.backward()  # the chunked head's backward runs too
        return [float(losses[owner == i].mean()) for i in range(len(batch_rows))]

    packed, unpacked = per_example(rows, True), per_example(rows, False)
    if row_tokens:
        assert batching.make_batch(rows, True, 0, torch.device("cpu"), row_tokens)["input_ids"].shape[0] > 1
    assert max(abs(a - b) for a, b in zip(packed, unpacked)) < 1e-5
    # Each example alone gives the same loss too: nothing leaks across an example's boundaries.
    alone = [per_example([row], True)[0] for row in rows]
    assert max(abs(a - b) for a, b in zip(packed, alone)) < 1e-5
    # Unpadded rows go without an attention mask (the causal kernels), and lose nothing by it.
    assert "attention_mask" not in batching.make_batch(rows[:1] * 2, False, 0, torch.device("cpu"))
    # Examples of one length are not packed, even when packing is asked for: there is no padding to remove.
    same = batching.make_batch(rows[:1] * 3, True, 0, torch.device("cpu"), row_tokens)
    assert same["input_ids"].shape[0] == 3 and "position_ids" not in same and "attention_mask" not in same
    alone_unpacked = [per_example([row], False)[0] for row in rows]
    assert max(abs(a - b) for a, b in zip(packed, alone_unpacked)) < 1e-5


def test_packed_layout_holds_every_micro_batch_in_one_shape_or_declines_when_padding_would_dominate():
    from tunepipe.tasks.train import batching

    layout = batching.packed_layout([[30, 50, 20], [60, 60], [10, 40, 5, 5]])
    assert layout == batching.PackedLayout(width=100, segments=5, longest=50)  # [60, 60] is not packed
    assert layout.blocks([30, 50, 20]) == [30, 50, 20, 0, 0]
    assert layout.blocks([10, 40, 5, 5]) == [10, 40, 5, 5, 40]  # the padding is a block of its own
    assert layout.blocks([5, 5]) == [5, 5, 50, 40, 0]  # no block longer than the longest example
    assert layout.blocks([60, 30]) is None  # an example longer than the layout's longest
    assert layout.blocks([50, 50, 10]) is None  # too wide
    assert layout.blocks([1, 1, 1, 1, 1]) is None  # 95 of padding: seven blocks
    # One packed micro-batch needs no layout; padding every one to the widest must not cost over a quarter.
    assert batching.packed_layout([[60, 60], [10, 40]]) is None
    assert batching.packed_layout([[10, 20], [100, 200]]) is None  # 45% of the tokens would be padding
    assert batching.packed_layout([[10, 20], [100, 200]], max_padding=0.5) is not None


def test_a_row_of_the_packed_layout_gives_every_example_its_own_loss(formatted, tiny_model):
    """A layout's row (the examples, padding in blocks, empty blocks) trains as the examples do unpacked."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.train import batching, stepper

    data, _ = formatted
    rows = data.train.rows()[:6]
    lengths = [len(row["input_ids"]) for row in rows]
    layout = batching.packed_layout([lengths, lengths[:3]], max_padding=1.0)
    batch = batching.make_batch(rows[:3], True, 0, torch.device("cpu"), layout=layout)
    blocks = batch["packed_seq_lengths"].tolist()
    assert batch["input_ids"].shape == (1, layout.width) and len(blocks) == layout.segments
    assert blocks[:3] == lengths[:3] and sum(blocks) == layout.width and max(blocks) <= layout.longest
    assert len([n for n in blocks[3:] if n]) > 1  # the padding took more than one block
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")

    def per_example(batch: dict, n: int) -> list[float]:
        with torch.no_grad():
            _, losses, owner = stepper.token_losses(model, batch, "hf", head_chunk=64)
        return [float(losses[owner == i].mean()) for i in range(n)]

    unpacked = per_example(batching.make_batch(rows[:3], False, 0, torch.device("cpu")), 3)
    assert per_example(batch, 3) == pytest.approx(unpacked, abs=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_loss_and_gradients_equal_plain_cross_entropy(with_bias):
    """The fused head (gradients computed in the forward pass, chunk by chunk) against autograd through the
    full logits, in fp32: losses, and gradients of the hidden states, the weight and the bias."""
    import torch

    from tunepipe.tasks.train.head_loss import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=with_bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    total, losses = head_cross_entropy(hidden, head, targets, chunk=5)
    (2.5 * total).backward()  # a scaled sum, as the training step scales it
    ours = [hidden.grad, head.weight.grad, head.bias.grad if with_bias else None]

    for tensor in (hidden, *head.parameters()):
        tensor.grad = None
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (2.5 * expected.sum()).backward()
    torch.testing.assert_close(losses, expected.detach())
    torch.testing.assert_close(total.detach(), expected.sum().detach())
    for got, want in zip(ours, [hidden.grad, head.weight.grad, head.bias.grad if with_bias else None]):
        if want is not None:
            torch.testing.assert_close(got, want)


def test_training_in_a_worker_learns_and_writes_an_adapter(uninterrupted):
    assert uninterrupted.kind == "lora" and uninterrupted.backend == "hf" and uninterrupted.device == "cpu x1"
    assert (uninterrupted.adapter_dir / "adapter_config.json").is_file()
    assert [p.step for p in uninterrupted.loss_history] == list(range(1, STEPS + 1))
    assert uninterrupted.loss_history[-1].loss < uninterrupted.loss_history[0].loss
    assert all(p.grad_norm and p.tokens_per_s for p in uninterrupted.loss_history)
    assert not (uninterrupted.adapter_dir.parent / "checkpoints").exists()  # superseded by the adapter


def test_sigkilled_training_resumes_from_its_checkpoint(formatted, uninterrupted, tmp_path):
    request = request_for(formatted, tmp_path / "stage")
    seen: list[int] = []

    def kill_after_step_5(event: dict) -> None:
        if event["event"] == "started":
            seen.append(event["pid"])
        elif event["event"] == "step":
            seen.append(event["step"])
            if event["step"] == 5:
                os.kill(seen[0], signal.SIGKILL)

    with pytest.raises(WorkerFailed, match="killed by SIGKILL"):
        train_in_worker(request, kill_after_step_5)
    last_done = max(seen[1:])
    assert STEPS > last_done >= 5

    resumed = train_in_worker(request)
    assert last_done - resumed.resumed_from_step <= SAVE_STEPS
    assert resumed.resumed_from_step == SAVE_STEPS * (last_done // SAVE_STEPS)
    assert resumed.steps == STEPS
    assert_same_training(resumed, uninterrupted, atol=1e-6)


def test_two_processes_match_one_and_only_rank_0_writes(formatted, uninterrupted, tmp_path):
    events: list[dict] = []
    request = request_for(formatted, tmp_path / "stage", batch_size=2, devices=2)  # 2 x 2 = the same 4 a step
    result = train_in_worker(request, events.append, devices=2)
    assert result.device == "cpu x2"
    # Two ranks' gradients are summed in another order than one process's: fp32 rounding, as in the
    # out-of-memory test below (1.3e-5 seen on one weight); a wrongly scaled step is off by ~lr.
    assert_same_training(result, uninterrupted, atol=5e-5)
    # Rank 0 alone reports and writes: one event per step, one adapter, and only its files in the stage folder.
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == sorted(
        p.name for p in uninterrupted.adapter_dir.parent.iterdir()
    )


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(
    formatted, uninterrupted, tmp_path, monkeypatch
):
    import torch

    from tunepipe.tasks.train import loop, stepper

    real_micro = stepper.Stepper._micro

    def micro_that_fits_two(self, rows, loss_tokens, **kwargs):
        if len(rows) > 2:  # what a too-small GPU does: fail the larger micro-batch, fit the smaller
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_micro(self, rows, loss_tokens, **kwargs)

    monkeypatch.setattr(stepper.Stepper, "_micro", micro_that_fits_two)
    result = loop.train_model(request_for(formatted, tmp_path / "stage"))
    assert (result.oom_retries, result.micro_batch_size, result.gradient_accumulation_steps) == (1, 2, 2)
    # Two micro-batches of 2 sum in another order than one of 4: fp32 rounding, which Adam's normalised update
    # magnifies where a gradient is near zero (1.2e-5 seen on one weight); a wrongly scaled step is off by ~lr.
    assert_same_training(result, uninterrupted, atol=5e-5)


def test_out_of_memory_drops_the_packed_layout_whose_rows_are_as_wide_as_the_larger_micro_batches(monkeypatch):
    import torch

    from tunepipe.tasks.train.batching import PackedLayout
    from tunepipe.tasks.train.checkpoints import TrainingState
    from tunepipe.tasks.train.environment import Rank
    from tunepipe.tasks.train.stepper import Stepper

    class Model:
        def zero_grad(self, set_to_none):
            pass

    def micro_that_fits_two(self, rows, loss_tokens, **kwargs):
        if len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.tensor(float(len(rows)))

    monkeypatch.setattr(Stepper, "_micro", micro_that_fits_two)
    stepper = Stepper(
        model=Model(),
        scaler=None,
        device=torch.device("cpu"),
        precision="fp32",
        backend="unsloth",
        packing=True,
        row_tokens=None,
        head_chunk=64,
        pad_id=0,
        max_oom_retries=1,
        rank=Rank(),
        packed_layout=PackedLayout(width=300, segments=6, longest=90),
    )
    state = TrainingState(micro_batch_size=4)
    assert float(stepper.run([{"input_ids": [1] * n} for n in (50, 60, 70, 80)], 1, state, step=1)) == 4
    assert state.micro_batch_size == 2 and stepper.packed_layout is None


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"mode": "qlora"}, "qlora .* needs a CUDA GPU"),
        ({"backend": "unsloth"}, "unsloth needs a CUDA GPU"),
        ({"optimizer": "adamw_8bit"}, "adamw_8bit .* needs a CUDA GPU"),
        ({"mode": "full", "batch_size": 200_000}, r"needs about [\d.]+ GiB \(weights .*GiB free"),
        ({"objective": "sft+kto", "devices": 2}, "train.objective=sft\\+kto trains on one device"),
    ],
)
def test_environment_check_refuses_before_loading_a_model(formatted, tmp_path, train, message):
    from tunepipe.tasks.train.environment import Rank, TrainingEnvironmentError, check_environment, choose_backend

    request = request_for(formatted, tmp_path, **train)
    with pytest.raises(TrainingEnvironmentError, match=message):
        backend = choose_backend(request.cfg.backend, request.cfg.mode, request.cfg.devices)
        check_environment(request, backend, Rank())


def test_memory_estimate_counts_what_the_mode_trains(formatted, tmp_path):
    from transformers import AutoConfig

    from tunepipe.tasks.train.environment import estimate_memory

    lora = request_for(formatted, tmp_path)
    full = request_for(formatted, tmp_path, mode="full")
    config = AutoConfig.from_pretrained(lora.base.name_or_path)
    lora_gib, full_gib = (estimate_memory(config, r, "fp32", False, True) for r in (lora, full))
    assert full_gib["optimizer"] > 100 * lora_gib["optimizer"] > 0
    assert full_gib["weights"] == lora_gib["weights"] > 0


def test_auto_checkpointing_recomputes_only_when_activations_would_not_fit(formatted, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from tunepipe.tasks.train import environment

    request = request_for(formatted, tmp_path, gradient_checkpointing="auto", batch_size=64)
    config = AutoConfig.from_pretrained(request.base.name_or_path)
    with_, without = (
        sum(environment.estimate_memory(config, request, "fp32", False, c).values()) for c in (True, False)
    )
    assert with_ < without
    between = (with_ + without / environment.AUTO_CHECKPOINTING_SHARE) / 2
    for free, expected in ((4 * without, False), (between, True)):
        monkeypatch.setattr(environment, "available_host_memory_gib", lambda free=free: free)
        report = environment.check_environment(request, "hf", environment.Rank())
        assert report.gradient_checkpointing is expected
        assert report.estimate_gib == pytest.approx(with_ if expected else without, abs=0.01)


def test_init_from_continues_from_an_earlier_adapter(formatted, uninterrupted, tmp_path):
    from tunepipe.tasks.train.loop import train_model

    request = request_for(formatted, tmp_path / "stage", max_steps=1).model_copy(
        update={"init_from": uninterrupted.adapter_dir}
    )
    continued = train_model(request)
    # Step 1's loss is measured before its update: with the earlier weights it starts where they ended.
    first, last = uninterrupted.loss_history[0].loss, uninterrupted.loss_history[-1].loss
    assert continued.loss_history[0].loss < (first + last) / 2


# ------------------------------------------------------------------ held-out evaluations and the best checkpoint

# A rate this high makes the tiny model's held-out loss jump after its first step:
# the best checkpoint is step 1, and two evaluations without a gain stop training at step 3.
PEAKED = dict(
    learning_rate=0.3,
    lr_scheduler="constant",
    warmup_steps=0,
    eval_steps=1,
    max_steps=8,
    save_steps=2,
    early_stopping={"patience": 2},
)


@pytest.fixture(scope="module")
def held_out(formatted, loaded, tmp_path_factory) -> HeldOut:
    """The first 8 held-out rows (a smaller split keeps each evaluation to a second)."""
    data, _ = formatted
    rows = data.eval.path.read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("held-out") / "eval.jsonl"
    path.write_text("".join(row + "\n" for row in rows))
    return HeldOut(
        loss_rows=data.eval.model_copy(update={"path": path, "n_rows": len(rows)}),
        examples=loaded.eval_path,
        train_examples=loaded.train_path,
        metric="eval_loss",
        output_format="json",
        max_new_tokens=8,
        batch_size=4,
    )


def with_held_out(request: TrainRequest, held_out: HeldOut, **update) -> TrainRequest:
    return request.model_copy(update={"held_out": held_out.model_copy(update=update)})


@pytest.fixture(scope="module")
def peaked(formatted, held_out, tmp_path_factory) -> TrainResult:
    from tunepipe.tasks.train.loop import train_model

    return train_model(with_held_out(request_for(formatted, tmp_path_factory.mktemp("peaked"), **PEAKED), held_out))


def test_the_best_checkpoint_is_what_training_returns_and_export_writes(formatted, held_out, peaked, tmp_path):
    """The held-out loss peaks at step 1; early stopping ends at step 3; the adapter and the exported GGUF are
    those of a run that stopped at step 1 (constant rate: the same first step)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.evaluate.worker import answer_losses, mean_answer_loss
    from tunepipe.tasks.export.task import export_model
    from tunepipe.tasks.runtime.config import ExportConfig
    from tunepipe.tasks.train.loop import train_model

    losses = [p.eval_loss for p in peaked.eval_history]
    assert [p.step for p in peaked.eval_history] == [1, 2, 3]
    assert losses[0] < min(losses[1:])  # a later step is worse
    assert (peaked.selected_step, peaked.steps, peaked.stopped_early) == (1, 3, True)
    assert peaked.selection.startswith("train.select=best: step 1 (eval_loss")
    assert [p.step for p in peaked.loss_history] == [1, 2, 3]

    one_step = train_model(
        request_for(formatted, tmp_path / "one", **(PEAKED | dict(max_steps=1, eval_steps=None, early_stopping=None)))
    )
    assert one_step.selected_step is None and one_step.eval_history == []
    ours, theirs = adapter_weights(peaked), adapter_weights(one_step)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    # The curve's value is what the evaluate stage measures on the returned (merged) model.
    base = request_for(formatted, tmp_path).base
    merged = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.name_or_path), peaked.adapter_dir)
        .merge_and_unload()
        .eval()
    )
    with torch.no_grad():
        assert mean_answer_loss(answer_losses(merged, held_out.loss_rows.rows(), 4, 0)) == pytest.approx(
            losses[0], rel=1e-4
        )
    export = ExportConfig(gguf_types=["f16"], lora_gguf=False)
    ggufs = [
        export_model(result, base, export, tmp_path / f"export-{name}").ggufs[0]
        for name, result in (("best", peaked), ("one", one_step))
    ]
    assert ggufs[0].sha256 == ggufs[1].sha256


def test_evaluating_an_answer_metric_does_not_change_the_training(formatted, held_out, tmp_path):
    """Greedy answers during training (field accuracy on 2 prompts) leave the weights as without them."""
    from tunepipe.tasks.train.loop import train_model

    short = dict(max_steps=2, save_steps=10)
    plain = train_model(request_for(formatted, tmp_path / "plain", **short))
    measured = train_model(
        with_held_out(
            request_for(formatted, tmp_path / "measured", eval_steps=1, eval_samples=2, **short),
            held_out,
            metric="field_accuracy",
        )
    )
    assert [p.step for p in measured.eval_history] == [1, 2]
    assert {"field_accuracy", "valid_json_rate", "exact_match"} <= measured.eval_history[0].metrics.keys()
    assert measured.selection.startswith("train.select=best: step ")
    assert_same_training(measured, plain, atol=0)


def test_killed_training_resumes_with_its_best_checkpoint_and_patience(formatted, held_out, peaked, tmp_path):
    """Killed after step 3 began (a checkpoint at step 2: best step 1, one evaluation without a gain): the
    resumed run stops at step 3 as the uninterrupted one did, returning step 1's weights."""
    request = with_held_out(request_for(formatted, tmp_path / "stage", **PEAKED), held_out)
    pid: list[int] = []
    checkpoints = tmp_path / "stage" / "checkpoints"

    def kill_at_step_3(event: dict) -> None:
        if event["event"] == "started":
            pid.append(event["pid"])
        elif event["event"] == "step" and event["step"] == 3:
            os.kill(pid[0], signal.SIGKILL)

    with pytest.raises(WorkerFailed, match="killed by SIGKILL"):
        train_in_worker(request, kill_at_step_3)
    # The newest checkpoint and the best weights it names, nothing else.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-0000001", "step-0000002"]
    events: list[dict] = []
    resumed = train_in_worker(request, events.append)
    assert resumed.resumed_from_step == 2
    assert [e["step"] for e in events if e["event"] == "eval"] == [1, 2, 3]  # the curve so far, then step 3
    assert (resumed.steps, resumed.selected_step, resumed.stopped_early) == (3, 1, True)
    assert [p.eval_loss for p in resumed.eval_history] == pytest.approx([p.eval_loss for p in peaked.eval_history])
    assert_same_training(resumed, peaked, atol=1e-6)


def test_continuing_an_attempt_evaluates_the_weights_it_starts_from(formatted, held_out, peaked, tmp_path):
    from tunepipe.tasks.train.loop import train_model

    request = with_held_out(request_for(formatted, tmp_path, **(PEAKED | dict(max_steps=1))), held_out)
    continued = train_model(request.model_copy(update={"init_from": peaked.adapter_dir}))
    assert [p.step for p in continued.eval_history] == [0, 1]
    assert continued.eval_history[0].eval_loss == pytest.approx(peaked.eval_history[0].eval_loss, rel=1e-5)


def test_the_best_evaluation_breaks_ties_by_loss_and_patience_counts_gains_over_min_delta():
    from tunepipe.tasks.train.checkpoints import TrainingState
    from tunepipe.tasks.train.results import EvalPoint
    from tunepipe.tasks.train.selection import track_best

    state = TrainingState(micro_batch_size=1)
    scores = [(0.50, 1.0), (0.50, 0.9), (0.52, 1.1), (0.40, 0.5), (0.60, 0.8)]  # (field accuracy, eval loss)
    new_best, patience = [], []
    for step, (accuracy, loss) in enumerate(scores, start=1):
        point = EvalPoint(step=step, eval_loss=loss, metrics={"field_accuracy": accuracy}, elapsed_s=0.0)
        new_best.append(track_best(state, point, "field_accuracy", min_delta=0.05))
        patience.append(state.evals_without_gain)
    # Step 2 ties step 1 with a lower loss; step 3 is better (a best) but by less than min_delta (no gain).
    assert new_best == [True, True, True, False, True]
    assert patience == [0, 1, 2, 3, 0]
    assert state.best.step == 5
    lower = TrainingState(micro_batch_size=1)
    for step, loss in enumerate([2.0, 1.5, 1.7], start=1):
        track_best(lower, EvalPoint(step=step, eval_loss=loss, elapsed_s=0.0), "eval_loss", min_delta=0.0)
    assert (lower.best.step, lower.evals_without_gain) == (2, 1)
