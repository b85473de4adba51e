"""The training loop on a CUDA GPU (skipped elsewhere: unsloth imports only where CUDA is): unsloth's
packed micro-batches attend within their examples only, like the hf path's test in test_training.py, and steps
replayed from CUDA graphs train as eager steps do."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from tunepipe.tasks.data.format import IGNORE

pytestmark = pytest.mark.slow  # trains on a GPU

LENGTHS = (37, 90, 12, 64, 90, 25)  # two equal lengths: unsloth's per-segment fallback would group them
BF16_TOLERANCE = 2e-2  # the same example's mean loss over different batch layouts in bf16
LEAK_AT_LEAST = 5 * BF16_TOLERANCE  # a leak moves some example's loss by this much (0.06-0.2 at fp32 on the CPU)


@pytest.fixture(scope="module")
def cuda_with_unsloth():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        pytest.skip("the unsloth backend trains on a CUDA GPU only")
    import unsloth  # noqa: F401  (before transformers' models: it patches them)

    return torch.device("cuda")


def small_gqa_model(out_dir: Path) -> Path:
    """A 2-layer Qwen3 with grouped K / V heads, random weights large enough (init 0.2) that context moves the
    losses, and a word-level tokenizer: no download, no llama.cpp vocabulary."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {f"w{i}": i for i in range(512)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
        pad_token="w0",
        eos_token="w1",
        unk_token="w1",
    )
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
    )
    Qwen3ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_unsloth_packed_loss_equals_unpacked_loss_for_every_example(cuda_with_unsloth, tmp_path, monkeypatch):
    import torch
    from unsloth import FastLanguageModel
    from unsloth.utils import attention_dispatch

    from tunepipe.tasks.patches import unsloth as unsloth_patches
    from tunepipe.tasks.train import batching, stepper

    device = cuda_with_unsloth
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(small_gqa_model(tmp_path / "model")),
        max_seq_length=1024,
        dtype=torch.bfloat16,
        load_in_4bit=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        use_gradient_checkpointing=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    assert unsloth_patches.unsloth_packs(device)
    kernel, varlen_calls = attention_dispatch._TORCH_VARLEN_ATTN, []

    def counted(*args, **kwargs):
        varlen_calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention_dispatch, "_TORCH_VARLEN_ATTN", counted)
    rng = random.Random(0)
    rows = []
    for n in LENGTHS:  # a prompt without loss, then the answer
        ids = [rng.randrange(2, 512) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3 :]})

    def per_example(batch_rows: list[dict], packing: bool) -> list[float]:
        batch = batching.make_batch(batch_rows, packing, 0, device)  # packed: one row, as the loop packs unsloth's
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, losses, owner = stepper.token_losses(model, batch, "unsloth", head_chunk=64)
        total.backward()  # the varlen kernel's backward runs too
        return [float(losses[owner == i].mean()) for i in range(len(batch_rows))]

    packed = per_example(rows, True)
    assert varlen_calls == [torch.Size([sum(LENGTHS), 4, 32])] * 2  # one call a layer, the whole row at once
    unpacked = per_example(rows, False)
    alone = [per_example([row], False)[0] for row in rows]
    print(
        f"packed vs padded: {max(abs(a - b) for a, b in zip(packed, unpacked)):.4f}; "
        f"vs alone: {max(abs(a - b) for a, b in zip(packed, alone)):.4f}"
    )
    assert max(abs(a - b) for a, b in zip(packed, unpacked)) < BF16_TOLERANCE
    assert max(abs(a - b) for a, b in zip(packed, alone)) < BF16_TOLERANCE

    # The check sees a leak: the same examples as one plain causal sequence move the losses well past it.
    joined = {"input_ids": sum((r["input_ids"] for r in rows), []), "labels": sum((r["labels"] for r in rows), [])}
    batch = batching.make_batch([joined], False, 0, device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, losses, _ = stepper.token_losses(model, batch, "unsloth", head_chunk=64)
    leaky, start = [], 0
    for row in rows:  # every example starts with a prompt, so no loss crosses into the next one
        n = sum(label != IGNORE for label in row["labels"][1:])
        leaky.append(float(losses[start : start + n].mean()))
        start += n
    print(f"packed vs leaky: {max(abs(a - b) for a, b in zip(packed, leaky)):.4f}")
    assert max(abs(a - b) for a, b in zip(packed, leaky)) > LEAK_AT_LEAST


def test_varlen_kernel_given_grouped_kv_heads_attends_as_with_repeated_heads(cuda_with_unsloth):
    """Where `_varlen_attn_with_gqa` hands grouped K / V heads to flash attention as they are, its outputs and
    gradients (K / V's summed over each group) are those of the same heads repeated."""
    import torch

    from tunepipe.tasks.patches import torch as torch_patches

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    device = cuda_with_unsloth
    attend = torch_patches.varlen_attn_with_gqa(device)
    if attend is None or not torch_patches.kernel_groups_kv_heads(varlen.varlen_attn, device):
        pytest.skip("this torch's varlen_attn is missing or refuses grouped K / V heads: attend repeats them")
    torch.manual_seed(0)
    query = torch.randn(211, 16, 128, device=device, dtype=torch.bfloat16)  # Qwen3-0.6B's heads: 16 / 8
    key, value = (torch.randn(211, 8, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    bounds = torch.tensor([0, 37, 127, 140, 211], dtype=torch.int32, device=device)
    grad_out = torch.randn_like(query)

    def attention_and_grads(grouped: bool):
        q, k, v = (x.clone().requires_grad_() for x in (query, key, value))
        if grouped:
            out = attend(q, k, v, bounds, bounds, 90, 90, window_size=(-1, 0), enable_gqa=True)
        else:
            out = varlen.varlen_attn(
                q,
                k.repeat_interleave(2, dim=1),
                v.repeat_interleave(2, dim=1),
                bounds,
                bounds,
                90,
                90,
                window_size=(-1, 0),
            )
        out.backward(grad_out)
        return out, q.grad, k.grad, v.grad

    for name, grouped, repeated in zip(
        ("out", "dq", "dk", "dv"), attention_and_grads(True), attention_and_grads(False)
    ):
        error = float((grouped.float() - repeated.float()).abs().max() / repeated.float().abs().max())
        print(f"{name}: {error:.2e} of its largest value")
        assert error < 1e-2, name


def lora_model(path: str, backend: str, recompute, device):
    """The small model with LoRA on all seven projections, recomputation as the loop sets it up."""
    import torch

    from tunepipe.tasks.train.recompute import checkpoint_layers

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=1024, dtype=torch.bfloat16, load_in_4bit=False
        )
        model = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, target_modules=targets, use_gradient_checkpointing=bool(recompute)
        )
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        if recompute:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model.to(device), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    if recompute:
        assert checkpoint_layers(model, recompute) == 2
    return model


RECOMPUTE = pytest.mark.parametrize(
    "recompute", [False, True, "offload"], ids=["no-recomputation", "recomputation", "offloaded-recomputation"]
)


def train_steps(model, steps: list[list[dict]], backend: str, cuda_graphs: bool, layout=None):
    """SGD steps of two micro-batches each from the model's current weights: the losses, the trainable weights
    after every step, and the stepper."""
    import torch

    from tunepipe.tasks.train.batching import n_loss_tokens
    from tunepipe.tasks.train.checkpoints import TrainingState
    from tunepipe.tasks.train.environment import Rank
    from tunepipe.tasks.train.stepper import Stepper, finish_step

    model.zero_grad(set_to_none=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    stepper = Stepper(
        model=model,
        scaler=scaler,
        device=torch.device("cuda"),
        precision="bf16",
        backend=backend,
        packing=True,
        row_tokens=None,
        head_chunk=64,
        pad_id=0,
        max_oom_retries=0,
        rank=Rank(),
        cuda_graphs=cuda_graphs,
        packed_layout=layout,
    )
    state = TrainingState(micro_batch_size=2)
    losses, weights = [], []
    for step, rows in enumerate(steps, 1):
        tokens = sum(n_loss_tokens(row) for row in rows)
        losses.append(float(stepper.run(rows, tokens, state, step)))
        finish_step(trainable, optimizer, scheduler, scaler, None, set_to_none=not stepper.gradients_in_graphs)
        weights.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    return losses, weights, stepper


def assert_trained_alike(graphed, eager, start: dict, label: str) -> None:
    """Plain SGD keeps the weights' differences proportional to the gradients' (Adam's first steps move every
    weight by about the learning rate whatever its gradient's size); a replay whose gradient replaced the
    accumulated one, instead of adding to it, would move them by about as much as a step does."""
    (graphed_losses, graphed_weights, _), (eager_losses, eager_weights, _) = graphed, eager
    moved = max(float((eager_weights[-1][name] - value).abs().max()) for name, value in start.items())
    print(f"{label}: losses eager {eager_losses}, graphed {graphed_losses}; largest weight move {moved:.3e}")
    assert graphed_losses == pytest.approx(eager_losses, rel=5e-3)
    for step, (graphed_step, eager_step) in enumerate(zip(graphed_weights, eager_weights), 1):
        for name in start:
            difference = float((graphed_step[name] - eager_step[name]).abs().max())
            assert difference <= 2e-2 * moved, f"step {step}, {name}: {difference:.3e} (moved {moved:.3e})"


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
@RECOMPUTE
def test_steps_replayed_from_cuda_graphs_train_as_eager_steps(cuda_with_unsloth, tmp_path, backend, recompute):
    """Four steps of two micro-batches each (so gradients accumulate over graph replays), from the same start,
    with the transformer replayed from CUDA graphs and without: the same losses and weights after every step."""
    from tunepipe.tasks.train import checkpoints

    model = lora_model(str(small_gqa_model(tmp_path / "model")), backend, recompute, cuda_with_unsloth)
    model.train()
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    rng = random.Random(1)
    steps = []
    for _ in range(4):  # four rows of one length a step: no padding, nothing packed
        ids = [[rng.randrange(2, 512) for _ in range(64)] for _ in range(4)]
        steps.append([{"input_ids": row, "labels": [IGNORE] * 16 + row[16:]} for row in ids])
    eager = train_steps(model, steps, backend, cuda_graphs=False)
    checkpoints.load_trainable(model, start)
    graphed = train_steps(model, steps, backend, cuda_graphs=True)
    stepper = graphed[2]
    assert not stepper.graphs.failed
    assert stepper.graphs.shape == (2, 64)  # the second micro-batch of step 1 was captured
    assert_trained_alike(graphed, eager, start, f"{backend}, recompute {recompute}")


@RECOMPUTE
def test_packed_rows_replayed_from_cuda_graphs_train_as_eager_packed_rows(cuda_with_unsloth, tmp_path, recompute):
    """unsloth's packed micro-batches in the run's one layout (padding blocks, empty blocks), replayed from CUDA
    graphs, train as the same examples packed eagerly into rows of their own width, which attend within each
    example (test_unsloth_packed_loss_equals_unpacked_loss_for_every_example)."""
    from tunepipe.tasks.patches import unsloth as unsloth_patches
    from tunepipe.tasks.train import batching, checkpoints

    model = lora_model(str(small_gqa_model(tmp_path / "model")), "unsloth", recompute, cuda_with_unsloth)
    assert unsloth_patches.unsloth_packs(cuda_with_unsloth)  # as the loop asks before it packs
    model.train()
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    rng = random.Random(2)
    steps = []
    for _ in range(4):  # four examples of 20-90 tokens a step: two packed micro-batches of two
        rows = [[rng.randrange(2, 512) for _ in range(rng.randint(20, 90))] for _ in range(4)]
        steps.append([{"input_ids": row, "labels": [IGNORE] * 8 + row[8:]} for row in rows])
    layout = batching.packed_layout(
        [[len(row["input_ids"]) for row in rows[start : start + 2]] for rows in steps for start in (0, 2)],
        max_padding=1.0,
    )
    eager = train_steps(model, steps, "unsloth", cuda_graphs=False)
    checkpoints.load_trainable(model, start)
    graphed = train_steps(model, steps, "unsloth", cuda_graphs=True, layout=layout)
    stepper = graphed[2]
    assert not stepper.graphs.failed
    assert stepper.graphs.shape == (1, layout.width)  # the second micro-batch of step 1 was captured
    assert_trained_alike(graphed, eager, start, f"packed, recompute {recompute}, {layout}")


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_offloaded_recomputation_keeps_the_layer_inputs_off_the_gpu_and_trains_alike(
    cuda_with_unsloth, tmp_path, backend, monkeypatch
):
    """After the forward pass, the offloaded form has moved each layer's input to the host and holds less on the
    GPU than recomputation does (by at least a layer's input); the losses and LoRA gradients agree."""
    import torch

    from tunepipe.tasks.train import recompute, stepper

    moved = []
    on_host = recompute._OnHost.__init__

    def record(self, tensor, buffers):
        moved.append((tuple(tensor.shape), tensor.requires_grad))
        on_host(self, tensor, buffers)

    monkeypatch.setattr(recompute._OnHost, "__init__", record)
    device = cuda_with_unsloth
    path = str(small_gqa_model(tmp_path / "model"))
    rng = random.Random(2)
    rows = [[rng.randrange(2, 512) for _ in range(256)] for _ in range(4)]
    ids = torch.tensor(rows, device=device)
    held, results = {}, {}
    for mode in (True, "offload"):
        torch.manual_seed(0)  # the same LoRA initialisation (peft draws it from torch's generator)
        model = lora_model(path, backend, mode, device)
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = stepper.causal_lm_of(model).base_model(input_ids=ids, use_cache=False).last_hidden_state
        loss = hidden.float().pow(2).mean()
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        loss.backward()
        results[mode] = (
            float(loss),
            {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad},
        )
        del model, hidden, loss
        torch.cuda.empty_cache()
    layer_input = ids.numel() * 128 * 2  # tokens x hidden size x bf16
    print(
        f"{backend}: held after the forward pass, recomputation {held[True]} bytes, offloaded "
        f"{held['offload']} bytes; a layer's input {layer_input}; moved to the host {moved}"
    )
    assert len(moved) == 2  # each layer's input
    assert held[True] - held["offload"] >= layer_input
    (plain_loss, plain_grads), (offload_loss, offload_grads) = results[True], results["offload"]
    assert offload_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(offload_grads[name], grad, rtol=1e-3, atol=1e-6), name
