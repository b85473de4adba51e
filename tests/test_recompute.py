"""Recomputation (`tasks/train/recompute.py`) on the CPU: each decoder layer recomputed through our checkpoint
gives the gradients of a run without recomputation, and the host buffers of the offloaded form are lent and
taken back (the offload itself, and its memory on the GPU, are tests/test_training_gpu.py's)."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")

from tunepipe.tasks.train.recompute import (  # noqa: E402  (imports torch: only once importorskip found it)
    HostBuffers,
    LayerCheckpoint,
    _OnHost,
    checkpoint_layers,
)


def tiny_qwen3(recompute):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert checkpoint_layers(model, recompute) == 3
    return model.train()


@pytest.mark.parametrize("recompute", [True, "offload"])
def test_layers_recomputed_through_our_checkpoint_give_the_gradients_of_a_run_without(recompute):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in (False, recompute):
        model = tiny_qwen3(mode)
        calls = []
        for layer in model.model.layers:  # count each layer's forward: twice a step when recomputed
            layer.register_forward_pre_hook(
                lambda module, args, kwargs, calls=calls: calls.append(module), with_kwargs=True
            )
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == (6 if mode else 3)
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads[False].items():
        assert torch.allclose(grads[recompute][name], grad, atol=1e-6), name


def test_checkpoint_layers_needs_layers_whose_checkpointing_the_library_turned_on():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    with pytest.raises(RuntimeError, match="no decoder layer with checkpointing turned on"):
        checkpoint_layers(model, True)


def test_on_the_cpu_the_layer_inputs_stay_where_they_are_and_the_layer_is_recomputed():
    saved = []

    def layer(hidden, rotary):
        return hidden * rotary

    hidden = torch.ones(2, 3, requires_grad=True)
    rotary = torch.full((2, 3), 2.0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = LayerCheckpoint(HostBuffers())(layer, hidden, rotary)
    out.sum().backward()
    assert torch.equal(hidden.grad, rotary)  # recomputed correctly
    assert all(not isinstance(t, _OnHost) for t in saved)


def test_host_buffers_are_lent_by_rounded_size_and_taken_back_when_the_saved_input_is_dropped():
    buffers = HostBuffers()
    first = _OnHost(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), buffers)
    assert first.view.untyped_storage().nbytes() == 16  # 12 bytes, rounded up to a power of two
    assert torch.equal(first.to_device(), torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    second = _OnHost(torch.ones(5, dtype=torch.bfloat16), buffers)  # 10 bytes: the same size, another buffer
    assert second.view.data_ptr() != first.view.data_ptr()
    address = first.view.data_ptr()
    del first
    gc.collect()
    assert [b.data_ptr() for b in buffers.free[16]] == [address]
    third = _OnHost(torch.zeros(4, dtype=torch.float32), buffers)  # 16 bytes: the buffer given back
    assert third.view.data_ptr() == address and torch.equal(third.to_device(), torch.zeros(4))
