"""Each library's patches (tasks/patches/unsloth.py, torch.py, transformers.py) turn off on the CPU as they would on
a GPU with another version: the public path is taken, and nothing private is read. unsloth is never imported."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path

import pytest

from tunepipe.tasks import patches


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    monkeypatch.delenv(patches.OFF_SWITCH, raising=False)
    patches.enabled.cache_clear()
    yield
    patches.enabled.cache_clear()


def installed_as(monkeypatch, versions: dict[str, str]) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(patches.importlib.metadata, "version", lambda name: versions.get(name) or real(name))


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device as unsloth_packs asks about one: an Ampere-or-newer GPU (no CUDA is used)."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return torch.device("cuda")


@pytest.fixture
def fake_unsloth(monkeypatch):
    """unsloth's attention dispatch as a stand-in module: it holds no varlen kernel, as on torch 2.11."""
    dispatch = types.ModuleType("unsloth.utils.attention_dispatch")
    dispatch._TORCH_VARLEN_ATTN = None
    utils = types.ModuleType("unsloth.utils")
    utils.attention_dispatch = dispatch
    for name, module in (
        ("unsloth", types.ModuleType("unsloth")),
        ("unsloth.utils", utils),
        ("unsloth.utils.attention_dispatch", dispatch),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return dispatch


def test_unsloth_off_pads_without_reading_unsloths_private_names(monkeypatch, gpu, capsys):
    from tunepipe.tasks.patches.unsloth import unsloth_packs
    from tunepipe.tasks.train.batching import packs

    installed_as(monkeypatch, {"unsloth": "2026.11.2"})
    monkeypatch.setitem(sys.modules, "unsloth", None)  # any import of unsloth now fails, here and on a GPU
    assert not unsloth_packs(gpu)
    assert not packs(True, "unsloth", gpu)
    assert "padded" in capsys.readouterr().out


def test_unsloth_on_hands_it_the_torch_bridge(monkeypatch, gpu, fake_unsloth):
    from tunepipe.tasks.patches import torch as torch_patches
    from tunepipe.tasks.patches.unsloth import unsloth_packs

    bridge = object()
    monkeypatch.setattr(torch_patches, "varlen_attn_with_gqa", lambda device: bridge)
    installed_as(monkeypatch, {"unsloth": "2026.10.5"})
    assert unsloth_packs(gpu)
    assert fake_unsloth._TORCH_VARLEN_ATTN is bridge


def test_the_off_switch_turns_unsloth_off_on_its_proven_version(monkeypatch, gpu, fake_unsloth):
    from tunepipe.tasks.patches.unsloth import unsloth_packs

    installed_as(monkeypatch, {"unsloth": "2026.10.5"})
    monkeypatch.setenv(patches.OFF_SWITCH, "unsloth")
    assert not unsloth_packs(gpu)
    assert fake_unsloth._TORCH_VARLEN_ATTN is None  # not touched


@pytest.mark.parametrize(("version", "bridged"), [("2.11.0+cu130", True), ("2.13.0", False)])
def test_the_varlen_bridge_is_made_on_torch_2_11_alone(monkeypatch, version, bridged):
    import torch

    from tunepipe.tasks.patches import torch as torch_patches

    installed_as(monkeypatch, {"torch": version})
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch_patches, "kernel_groups_kv_heads", lambda varlen_attn, device: True)
    assert (torch_patches.varlen_attn_with_gqa(torch.device("cuda")) is not None) is bridged


def test_transformers_off_leaves_norms_and_attention_alone_and_answers_the_same(tiny_model: Path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.chat.generation import GROUPED_ATTENTION, greedy_answers, switches_undone
    from tunepipe.tasks.patches.transformers import attention_implementation, use_fused_norms

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:  # varied answers (the tiny model repeats one token)
                weight.normal_(0, 0.3)
    conversations = [[{"role": "user", "content": f"Kettle {'x' * (5 * i)}: price?"}] for i in range(4)]

    def answers():
        with torch.inference_mode():
            return greedy_answers(model, tokenizer, conversations, max_new_tokens=12, batch_size=3)

    with switches_undone(model):
        patched = answers()
        assert model.config._attn_implementation == GROUPED_ATTENTION
        assert any("forward" in vars(m) for m in model.modules())  # fused norms
    assert model.config._attn_implementation == "sdpa" and not any("forward" in vars(m) for m in model.modules())

    monkeypatch.setenv(patches.OFF_SWITCH, "transformers")
    patches.enabled.cache_clear()
    assert attention_implementation(model) is None and use_fused_norms(model) == 0
    with switches_undone(model):
        assert answers() == patched
        assert model.config._attn_implementation == "sdpa"  # transformers' own SDPA path
        assert not any("forward" in vars(m) for m in model.modules())  # the classes' own norms
