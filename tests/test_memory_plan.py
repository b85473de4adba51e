"""The run plan's memory: every stage against the machine, refused before any stage with the setting to change;
the estimates against what transformers allocates; the shard-by-shard merge against peft's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# Qwen2.5-7B-Instruct's config.json (the fields that size it).
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def seven_b(tiny_model: Path, tmp_path: Path) -> Path:
    """A folder that looks like Qwen2.5-7B to the planner: its config, the tiny model's tokenizer, no weights
    worth the name (the plan reads none)."""
    folder = tmp_path / "qwen2.5-7b-shape"
    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(QWEN2_5_7B))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _config(base: Path, tmp_path: Path, demo_data, **sections):
    from tunepipe.tasks.runtime.config import PipelineConfig

    train, eval_ = demo_data
    raw = {
        "name": "plan",
        "workdir": str(tmp_path / "runs"),
        "data": {"train": str(train), "eval": str(eval_)},
        "model": {"base": str(base), "max_seq_length": 512},
        "ollama": {"model_name": "plan"},
    }
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return PipelineConfig.model_validate(raw)


def test_model_shape_counts_qwen2_5_7b_as_published():
    from transformers import AutoConfig

    from tunepipe.tasks.runtime.memory_plan import model_shape, weights_bytes

    shape = model_shape(AutoConfig.for_model(**QWEN2_5_7B))
    assert shape.params == 7_615_616_512  # the model card's 7.61B
    assert shape.kv_per_token == 2 * 28 * 4 * 128
    # 4-bit: the decoder's linear layers in NF4, embeddings and LM head in 16 bits; about a third of bf16.
    assert 5.0 < weights_bytes(shape, True) / 2**30 < 5.3 < 14.2 == round(weights_bytes(shape, False) / 2**30, 1)


def test_estimates_match_what_transformers_allocates(tiny_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, StaticCache

    from tunepipe.tasks.runtime.memory_plan import model_shape, weights_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    shape = model_shape(model.config)
    assert weights_bytes(shape, False) == sum(p.numel() * p.element_size() for p in model.parameters())
    rows, length = 3, 40
    cache = StaticCache(config=model.config, max_cache_len=length)
    model(input_ids=torch.ones(rows, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert allocated == shape.kv_per_token * rows * length * 2


def test_rows_that_fit_leave_headroom():
    from tunepipe.tasks.runtime.memory_plan import HEADROOM, rows_that_fit

    assert rows_that_fit(100, 0, 1, 1000) == int(100 * (1 - HEADROOM))
    assert rows_that_fit(100, 50, 10, 16) == 4
    assert rows_that_fit(100, 50, 10, 2) == 2
    assert rows_that_fit(100, 95, 10, 16) == 0


def test_plan_refuses_a_run_that_cannot_fit_naming_the_stage_and_the_setting(seven_b, tmp_path, demo_data):
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.memory_plan import WillNotFit, run_memory_plan

    # A 16 GB card (a T4): LoRA on a 16-bit 7B base cannot train or evaluate there.
    lora = _config(seven_b, tmp_path, demo_data, model={"gpu_memory_gib": 16}, train={"mode": "lora"})
    base = resolve_base_model(lora.model)
    plan = run_memory_plan(lora, base, 512, 0.3)
    refused = {stage.stage for stage in plan.stages if not stage.fits}
    assert {"train", "evaluate"} <= refused
    with pytest.raises(WillNotFit) as raised:
        plan.check()
    message = str(raised.value)
    assert "will not fit: train needs about" in message and "set train.mode: qlora" in message
    assert "will not fit: evaluate needs about" in message

    # QLoRA fits the same card: every GPU stage, the evaluations during training included.
    qlora = _config(
        seven_b,
        tmp_path,
        demo_data,
        model={"gpu_memory_gib": 16},
        train={"mode": "qlora", "eval_steps": 10, "batch_size": 8},
    )
    plan = run_memory_plan(qlora, base, 512, 0.3)
    gpu = {stage.stage: stage for stage in plan.stages if stage.resource == "GPU memory"}
    assert set(gpu) == {"train", "evaluations during training", "evaluate"}
    assert all(stage.fits for stage in gpu.values()), plan.problems()
    assert 5 < gpu["evaluate"].need_gib < 8

    # A card too small even for the 4-bit weights: the stage and the setting are named.
    with pytest.raises(WillNotFit, match=r"will not fit: train needs about .* set a shorter model.max_seq_length"):
        run_memory_plan(
            qlora.model_copy(update={"model": qlora.model.model_copy(update={"gpu_memory_gib": 4})}), base, 512, 0.3
        ).check()


def test_check_refuses_before_training_and_names_the_setting(seven_b, tmp_path, demo_data):
    from tunepipe.deployments.run_plan import check_run
    from tunepipe.tasks.runtime.memory_plan import WillNotFit

    cfg = _config(seven_b, tmp_path, demo_data, model={"gpu_memory_gib": 16}, train={"mode": "lora"})
    with pytest.raises(WillNotFit, match="set train.mode: qlora"):
        check_run(cfg)


def test_export_plan_counts_disk_for_each_gguf_and_host_memory_for_one_tensor(seven_b, tmp_path, demo_data):
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.runtime.memory_plan import run_memory_plan

    cfg = _config(
        seven_b,
        tmp_path,
        demo_data,
        model={"gpu_memory_gib": 24},
        train={"mode": "qlora"},
        export={"gguf_types": ["q8_0", "q4_k_m"]},
    )
    plan = run_memory_plan(cfg, resolve_base_model(cfg.model), 512, 0.3)
    stages = {stage.stage: stage for stage in plan.stages}
    files = stages["export (files)"].parts
    assert files["merged model (16-bit)"] == pytest.approx(14.2, abs=0.1)
    assert set(files) == {"merged model (16-bit)", "GGUF f16", "GGUF q8_0", "GGUF q4_k_m", "adapter GGUF"}
    # One tensor at a time: the embedding (152,064 x 3,584 in bf16) read and written, not the model twice.
    assert stages["export (merge)"].need_gib < 3
    assert stages["parity"].parts["largest GGUF"] == pytest.approx(7.6, abs=0.2)  # q8_0


@pytest.mark.parametrize("shards", ["one", "several"])
@pytest.mark.parametrize("rslora", [False, True])
def test_shard_merge_equals_peft_merge_and_unload(tiny_model: Path, tmp_path: Path, shards: str, rslora: bool):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.export.merge import merge_shards

    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size="300KB" if shards == "several" else "5GB")
    assert (base / "model.safetensors.index.json").is_file() == (shards == "several")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=rslora,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)

    merged = merge_shards(adapter, base, tmp_path / "merged")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    expected = reloaded.merge_and_unload().state_dict()
    written = {}
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            # safe_open is no mapping: it has keys() but cannot be iterated
            written.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    stored = {name for name in expected if name in written}
    assert stored == set(written)  # every tensor written (a tied LM head is stored once, as in the base)
    changed = 0
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name
        with safe_open(
            next(base.glob("*.safetensors"))
            if shards == "one"
            else base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][name],
            framework="pt",
        ) as f:
            changed += not torch.equal(tensor, f.get_tensor(name))
    assert changed == 3 * 4  # three targeted projections in each of the four layers
    assert json.loads((merged / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_shard_merge_refuses_an_adapter_for_another_base(tiny_model: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.export.merge import MergeError, merge_shards

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(base)
    adapter = tmp_path / "adapter"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    ).save_pretrained(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")  # as if trained on a model with more layers
    save_file(
        {k.replace("layers.0.", "layers.9."): v for k, v in weights.items()}, adapter / "adapter_model.safetensors"
    )
    with pytest.raises(MergeError, match=r"names tensors the base .* does not have: .*layers\.9\.self_attn\.q_proj"):
        merge_shards(adapter, base, tmp_path / "merged")


@pytest.mark.slow
def test_the_flow_refuses_a_run_that_cannot_fit_before_any_stage(prefect_server, seven_b, tmp_path, demo_data):
    from tunepipe.deployments.output import stage_states
    from tunepipe.flows.finetune import finetune

    cfg = _config(
        seven_b,
        tmp_path,
        demo_data,
        model={"gpu_memory_gib": 16},
        train={"mode": "lora"},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    state = finetune(cfg, return_state=True)
    assert state.is_failed()
    assert "will not fit: train needs about" in state.message and "set train.mode: qlora" in state.message
    stages = [name for name, _, _ in stage_states(state.state_details.flow_run_id)]
    assert stages == ["resolve_base_model"]  # identifying the base is all that ran
    assert not (tmp_path / "runs").exists()
