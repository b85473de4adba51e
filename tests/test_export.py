"""Export (every listed GGUF type, the LoRA adapter as GGUF, full fine-tuning) and the parity decision."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stage_results import trained

from tunepipe.tasks.export.parity import parity_verdicts
from tunepipe.tasks.export.results import GgufScores, ParityReport
from tunepipe.tasks.export.task import export_model
from tunepipe.tasks.runtime.config import ExportConfig

PROMPT = "<|im_start|>user\n<div>Smart Kettle, $25</div><|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lora_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model with non-zero weights (as after training), saved as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def _next_token_logits(gguf: Path, lora: Path | None = None):
    from tunepipe.tasks.integrations.llama_cpp import load_gguf

    llm = load_gguf(gguf, lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = llm.scores[len(ids) - 1].copy()
    llm.close()
    return logits


@pytest.mark.slow
def test_lora_export_writes_each_type_and_an_adapter_gguf_that_equals_the_merge(
    lora_adapter: Path, tiny_model: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    import numpy as np

    from tunepipe.tasks.runtime.base_model import BaseModelRef

    base = BaseModelRef(name_or_path=str(tiny_model), revision=None, fingerprint="tiny")
    exported = export_model(trained(lora_adapter), base, ExportConfig(gguf_types=["f16", "q8_0"]), tmp_path)

    assert [(g.type, g.path.name) for g in exported.ggufs] == [("f16", "model-f16.gguf"), ("q8_0", "model-q8_0.gguf")]
    ggufs = {g.type: g for g in exported.ggufs}
    assert ggufs["q8_0"].bytes < ggufs["f16"].bytes
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["adapter.gguf", "model-f16.gguf", "model-q8_0.gguf"]

    # FROM base + ADAPTER must give what the merged model gives: llama.cpp applies the adapter GGUF to the base.
    merged = _next_token_logits(ggufs["f16"].path)
    adapted = _next_token_logits(tiny_gguf, exported.adapter_gguf)
    unadapted = _next_token_logits(tiny_gguf)
    assert int(adapted.argmax()) == int(merged.argmax())
    assert np.abs(adapted - merged).max() < 0.05 * np.abs(merged).max()
    assert np.abs(unadapted - merged).max() > np.abs(adapted - merged).max()  # the adapter does something


def test_full_fine_tuning_exports_the_model_folder_without_an_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from tunepipe.tasks.runtime.base_model import BaseModelRef

    full = shutil.copytree(tiny_model, tmp_path / "trained" / "model")
    base = BaseModelRef(name_or_path=str(tiny_model), revision=None, fingerprint="tiny")
    exported = export_model(trained(full), base, ExportConfig(gguf_types=["q8_0"]), tmp_path / "export")

    assert (exported.merged_dir, exported.adapter_dir, exported.adapter_gguf) == (full, None, None)
    assert [g.type for g in exported.ggufs] == ["q8_0"]
    # The f16 file was only the quantization source.
    assert sorted(p.name for p in (tmp_path / "export").glob("*.gguf")) == ["model-q8_0.gguf"]


def test_old_single_type_field_still_reads() -> None:
    with pytest.warns(DeprecationWarning, match="gguf_types: \\[q4_k_m\\]"):
        assert ExportConfig.model_validate({"gguf_quantization": "q4_k_m"}).gguf_types == ["q4_k_m"]
    with pytest.raises(ValueError, match="set `gguf_types` only"):
        ExportConfig.model_validate({"gguf_quantization": "q4_k_m", "gguf_types": ["f16"]})


def test_parity_limits_per_metric_and_per_type() -> None:
    report = ParityReport(
        n_samples=50,
        samples_path=Path("samples.jsonl"),
        ggufs=[
            GgufScores(gguf_type="q8_0", scores={"exact_match": 0.80, "stop_rate": 1.0}),
            GgufScores(gguf_type="q4_k_m", scores={"exact_match": 0.76, "stop_rate": 1.0}),
            GgufScores(gguf_type="q5_k_m", scores={"exact_match": 0.78, "stop_rate": 0.9}),
        ],
    )
    reference = {"exact_match": 0.80, "stop_rate": 1.0, "valid_json_rate": None, "eval_loss": 0.3}
    cfg = ExportConfig(
        max_drop={"exact_match": 0.02, "stop_rate": 0.05, "valid_json_rate": 0.0},
        max_drop_by_type={"q4_k_m": {"exact_match": 0.05}},
    )

    verdicts = {v.gguf_type: v for v in parity_verdicts(report, reference, cfg)}

    assert verdicts["q8_0"].passed and verdicts["q4_k_m"].passed  # q4_k_m: its own, looser limit
    assert not verdicts["q5_k_m"].passed
    assert verdicts["q5_k_m"].failures == ["stop_rate: 0.9000 vs PyTorch 1.0000 (drop 0.1000 > 0.05)"]
    strict = ExportConfig(max_drop={"exact_match": 0.02})
    assert [v.passed for v in parity_verdicts(report, reference, strict)] == [True, False, True]
