"""Real pretrained models from GGUF: the packaged files, the transformers folder with a faithful tokenizer,
`model.base` as a .gguf file or `ollama:NAME`, and the export's vocabulary check, on SmolLM2 and Gemma 3."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.model.base import BaseModelError, resolve_base_model
from tunepipe.tasks.model.gguf_metadata import gguf_vocab, read_gguf_metadata
from tunepipe.tasks.model.gguf_tokenizer import SAMPLE_CONVERSATIONS, VocabularyMismatch, compare_token_ids
from tunepipe.tasks.model.packaged import packaged_gguf
from tunepipe.tasks.runtime.config import ModelConfig, OllamaConfig

pytestmark = pytest.mark.slow  # loads, trains and exports real models

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its package's SHA256SUMS


def test_gemma_is_assembled_from_its_four_chunk_packages_into_the_file_its_package_lists() -> None:
    path = packaged_gguf("gemma3-270m")
    with path.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == GEMMA_SHA256
    vocab = gguf_vocab(read_gguf_metadata(path))
    assert (vocab.model, vocab.pre, vocab.size) == ("llama", "default", 262_144)


def test_smollm2_folder_has_the_gguf_vocabulary_and_special_tokens(smollm2) -> None:
    from transformers import AutoTokenizer

    folder = Path(smollm2.name_or_path)
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["byte_fallback"] is False
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # transformers' GGUF reader says <|im_start|> for both; the GGUF names ids 1 and 2
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2]
    conversation = [
        {"role": "user", "content": "<li>Brand: Acme — 12.50 €</li>"},
        {"role": "assistant", "content": '{"brand": "Acme", "price": 12.5}'},
    ]
    compare_token_ids(tokenizer, smollm2.gguf, [tokenizer.apply_chat_template(conversation, tokenize=False)], "test")


def test_gemma_folder_has_the_gguf_vocabulary_and_the_supplied_turn_format(gemma3) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3.name_or_path)
    text = tokenizer.apply_chat_template(SAMPLE_CONVERSATIONS[0], tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nYou extract product data as JSON.\n\n<div")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in json.loads((Path(gemma3.name_or_path) / "generation_config.json").read_text())["eos_token_id"]
    compare_token_ids(tokenizer, gemma3.gguf, [text], "test")


def test_a_trained_gemma_keeps_what_the_converter_needs_and_transformers_does_not_save(gemma3, tmp_path) -> None:
    """transformers writes back no tokenizer.model (without it llama.cpp's converter takes Gemma's SentencePiece
    vocabulary for BPE and fails), no add_bos_token (without it the GGUF does not say to add the BOS the served
    prompts need) and no added_tokens_decoder (without it the converter types Gemma's user-defined tokens
    normal, and llama.cpp splits them): training's output and export's merged folder get them back."""
    from transformers import AutoTokenizer

    from tunepipe.tasks.model.base import keep_tokenizer_sources

    out = tmp_path / "adapter"
    AutoTokenizer.from_pretrained(gemma3.name_or_path).save_pretrained(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "tokenizer.model").exists() and not {"add_bos_token", "added_tokens_decoder"} & saved.keys()
    keep_tokenizer_sources(gemma3.name_or_path, out)
    assert (out / "tokenizer.model").read_bytes() == (Path(gemma3.name_or_path) / "tokenizer.model").read_bytes()
    base = json.loads((Path(gemma3.name_or_path) / "tokenizer_config.json").read_text())
    kept = json.loads((out / "tokenizer_config.json").read_text())
    assert kept == saved | {key: base[key] for key in ("add_bos_token", "add_eos_token", "added_tokens_decoder")}
    assert (kept["add_bos_token"], kept["added_tokens_decoder"]["107"]["content"]) == (True, "\n")


def test_a_quantized_source_warns_that_its_rounding_is_trained(smollm2) -> None:
    with pytest.warns(UserWarning, match="q4_1, below q8_0"):
        again = resolve_base_model(ModelConfig(base=str(smollm2.gguf)))
    assert again == smollm2  # the folder is built once; the warning is given on every run


def test_a_tokenizer_llama_cpp_does_not_reproduce_is_refused_naming_the_tokens(smollm2, tiny_gguf) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.name_or_path)
    with pytest.raises(
        VocabularyMismatch,
        match=r"check: text 1 .* from token 0 on, llama.cpp with model-f16.gguf "
        r"gives \[\d+",
    ):
        compare_token_ids(tokenizer, tiny_gguf, ["<|im_start|>user\nhello<|im_end|>"], "check")


def test_export_keeps_the_source_vocabulary_and_a_byte_fallback_tokenizer_is_caught(smollm2, tmp_path) -> None:
    """A tokenizer with byte_fallback sends the converter down the SentencePiece path; the GGUF it writes
    makes llama.cpp abort on the first text, which must come back as a message, not a dead process."""
    from tunepipe.tasks.export.task import VocabularyChanged, check_source_vocabulary, convert

    good = convert(Path(smollm2.name_or_path), tmp_path / "good.gguf", "f16")
    check_source_vocabulary(smollm2.gguf, good)

    bad_dir = tmp_path / "bad"
    shutil.copytree(smollm2.name_or_path, bad_dir)
    tokenizer_json = json.loads((bad_dir / "tokenizer.json").read_text())
    tokenizer_json["model"]["byte_fallback"] = True
    (bad_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    bad = convert(bad_dir, tmp_path / "bad.gguf", "f16")
    good.unlink()
    with pytest.raises(VocabularyChanged, match="model 'gpt2' became 'llama'; pre 'smollm' became 'default'"):
        check_source_vocabulary(smollm2.gguf, bad)

    from transformers import AutoTokenizer

    with pytest.raises(VocabularyMismatch, match=r"llama.cpp cannot tokenize .*std::out_of_range"):
        compare_token_ids(AutoTokenizer.from_pretrained(bad_dir), bad, ["<|im_start|>user\nhi<|im_end|>"], "bad")


def test_a_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(BaseModelError, match=r"model.base '.*nothere.gguf': no such file"):
        resolve_base_model(ModelConfig(base=str(tmp_path / "nothere.gguf")))


# --- ollama:NAME ----------------------------------------------------------------------------------------------


def _register(fake_ollama, gguf: Path, name: str) -> str:
    from tunepipe.tasks.integrations.ollama.client import OllamaClient

    client = OllamaClient(fake_ollama.url)
    digest = client.push_blob(gguf)
    client.create(name, files={gguf.name: digest}, template="{{ .Prompt }}", system=None, parameters={})
    return digest


def test_ollama_base_is_the_blob_the_api_names(smollm2, fake_ollama, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))  # only the API can know it
    digest = _register(fake_ollama, smollm2.gguf, "smollm2:135m")
    with pytest.warns(UserWarning, match="q4_1"):
        ref = resolve_base_model(
            ModelConfig(base="ollama:smollm2:135m"), OllamaConfig(model_name="x", host=fake_ollama.url)
        )
    assert ref.fingerprint == digest
    assert ref.gguf == fake_ollama.blob_path(digest).resolve()
    assert ref.name_or_path == smollm2.name_or_path  # same weights, same folder: not built twice


def test_ollama_base_is_found_in_the_models_folder_without_a_server(smollm2, monkeypatch, tmp_path) -> None:
    from conftest import closed_port

    models = tmp_path / "models"
    with smollm2.gguf.open("rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    (models / "blobs").mkdir(parents=True)
    (models / "blobs" / digest.replace(":", "-")).symlink_to(smollm2.gguf)
    manifest = models / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": digest,
                        "size": smollm2.gguf.stat().st_size,
                    },
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1},
                ],
            }
        )
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(models))
    with pytest.warns(UserWarning):
        ref = resolve_base_model(
            ModelConfig(base="ollama:smollm2:135m"),
            OllamaConfig(model_name="x", host=f"http://127.0.0.1:{closed_port()}"),
        )
    assert (ref.fingerprint, ref.name_or_path) == (digest, smollm2.name_or_path)


def test_an_ollama_model_nobody_has_is_an_error_saying_where_it_looked(fake_ollama, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    with pytest.raises(BaseModelError) as caught:
        resolve_base_model(ModelConfig(base="ollama:acme/chat"), OllamaConfig(model_name="x", host=fake_ollama.url))
    message = str(caught.value)
    assert f"the API at {fake_ollama.url} does not know it" in message
    assert "manifests/registry.ollama.ai/acme/chat/latest" in message
    assert "ollama pull acme/chat" in message


# --- end to end -----------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "Extract the product from the HTML as a JSON object with name, price, category and manufacturer."


def _short_pages(demo_data, root: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """The demo's product pages, few of them: CI's 2 cores train SmolLM2 at seconds per example."""
    paths = []
    for source, rows in zip(demo_data, (train_rows, eval_rows)):
        path = root / source.name
        path.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
        paths.append(path)
    return paths[0], paths[1]


def test_smollm2_fine_tuned_from_its_gguf_is_exported_parity_checked_and_served(
    smollm2, demo_data, prefect_server, fake_ollama, tmp_path
) -> None:
    """A few LoRA steps on a real instruct model from its Q4_1 GGUF: the base answers the pages in prose, the
    candidate in JSON; every GGUF keeps SmolLM2's vocabulary, answers through the served path and the
    Modelfile served by the Ollama stand-in passes the smoke test."""
    import yaml

    from tunepipe.flows.finetune import finetune
    from tunepipe.tasks.runtime.config import load_config

    train, eval_ = _short_pages(demo_data, tmp_path, 120, 3)
    config = {
        "name": "real-smollm2",
        "workdir": str(tmp_path / "runs"),
        "data": {
            "train": str(train),
            "eval": str(eval_),
            "system_prompt": SYSTEM_PROMPT,
            "output_format": "json",
            "min_rows": 20,
        },
        "model": {"base": str(smollm2.gguf), "max_seq_length": 256},
        "train": {
            "mode": "lora",
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "warmup_steps": 1,
            "gradient_checkpointing": False,
            "save_steps": 100,
        },
        "eval": {"max_samples": 3, "max_new_tokens": 48},
        # 3 pages can show no improvement over the base at 95% (3 of 3: [-0.42, +1]): a limit on the value.
        "gate": {"rules": {"valid_json_rate": {"min": 0.6}}},
        "retrain": {"max_attempts": 1},
        "export": {"gguf_types": ["f16", "q8_0"], "lora_gguf": False},
        "ollama": {"model_name": "real-smollm2", "host": fake_ollama.url, "smoke_examples": 2},
        "tracking": {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": "real",
            "artifact_location": str(tmp_path / "mlartifacts"),
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="q4_1"):
        state = finetune(load_config(path), return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    summary = state.result()
    assert summary.eval.base.metrics["valid_json_rate"] == 0.0
    assert summary.eval.candidate.metrics["valid_json_rate"] >= 2 / 3
    for gguf in summary.exported.ggufs:
        vocab = gguf_vocab(read_gguf_metadata(gguf.path))
        assert (vocab.model, vocab.pre) == ("gpt2", "smollm")
    for scores in summary.parity.ggufs:
        assert scores.vocabulary_problem is None and scores.prompt_mismatches == 0, scores
    assert summary.serving.served, summary.serving


@pytest.fixture(scope="module")
def gemma3_lora(gemma3, demo_data, tmp_path_factory):
    """Gemma 3 LoRA-trained 4 steps on a few product pages on the CPU (the training worker, as a run does):
    the candidate of the evaluate and export tests below."""
    from types import SimpleNamespace

    from tunepipe.tasks.data.format import format_dataset
    from tunepipe.tasks.data.load import load_dataset
    from tunepipe.tasks.runtime.config import DataConfig, LoraConfig, TrainConfig
    from tunepipe.tasks.runtime.worker import run_worker
    from tunepipe.tasks.train.results import TrainResult
    from tunepipe.tasks.train.task import TrainRequest

    root = tmp_path_factory.mktemp("gemma3-lora")
    train, eval_ = _short_pages(demo_data, root, 40, 3)
    data_cfg = DataConfig(train=train, eval=eval_, system_prompt=SYSTEM_PROMPT, output_format="json", min_rows=20)
    model_cfg = ModelConfig(base=str(gemma3.gguf), max_seq_length=320)
    loaded = load_dataset(data_cfg, root / "loaded")
    formatted = format_dataset(loaded.train_path, loaded.eval_path, gemma3, model_cfg, root / "formatted")
    request = TrainRequest(
        data=formatted.train,
        base=gemma3,
        model_cfg=model_cfg,
        lora=LoraConfig(r=16, alpha=32),
        cfg=TrainConfig(
            mode="lora",
            max_steps=4,
            batch_size=4,
            learning_rate=2e-3,
            warmup_steps=1,
            save_steps=100,
            gradient_checkpointing=False,
        ),
        out_dir=root / "train",
    )
    trained = run_worker("tunepipe.tasks.train.loop:train_model", request, TrainResult, root / "train")
    return SimpleNamespace(data_cfg=data_cfg, loaded=loaded, formatted=formatted, trained=trained)


def test_a_lora_trained_gemma3_exports_with_its_sentencepiece_vocabulary_and_answers_through_the_served_path(
    gemma3, gemma3_lora, tmp_path
) -> None:
    """Gemma 3 base with the Gemma turn format supplied, LoRA-trained and merged: no system role (the SYSTEM
    opens the first user turn), a SentencePiece vocabulary that must come back as one (export checks it against
    the source GGUF's), and BOS added by the vocabulary, not the template."""
    from tunepipe.tasks.export.parity import measure_parity
    from tunepipe.tasks.export.task import export_model
    from tunepipe.tasks.runtime.config import EvalConfig, ExportConfig

    assert gemma3_lora.trained.kind == "lora"
    exported = export_model(
        gemma3_lora.trained, gemma3, ExportConfig(gguf_types=["q8_0"], lora_gguf=False), tmp_path / "export"
    )
    vocab = gguf_vocab(read_gguf_metadata(exported.ggufs[0].path))
    assert vocab == gguf_vocab(read_gguf_metadata(gemma3.gguf))
    assert (vocab.model, vocab.pre, vocab.special["add_bos_token"]) == ("llama", "default", "true")

    report = measure_parity(
        exported,
        gemma3_lora.loaded.eval_path,
        gemma3_lora.loaded.train_path,
        gemma3_lora.data_cfg,
        EvalConfig(max_samples=2, max_new_tokens=16),
        OllamaConfig(model_name="gemma"),
        ChatContext(),
        tmp_path / "parity",
    )
    (scores,) = report.ggufs
    assert scores.vocabulary_problem is None
    assert scores.prompt_mismatches == 0  # Go's rendering + llama.cpp's BOS == the chat template + transformers
    served = [json.loads(line)["served_prompt"] for line in report.samples_path.read_text().splitlines()]
    assert served[0].startswith(f"<start_of_turn>user\n{SYSTEM_PROMPT}\n\n<")
    assert served[0].endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_gemma3_is_evaluated_base_against_candidate_by_the_batched_decoder(gemma3, gemma3_lora, tmp_path) -> None:
    """The evaluate stage on Gemma 3 and its sliding-window layers: prompt and answer fit the
    512-token window, where sliding attention is full attention. The LoRA adapter `gemma3_lora` is the
    candidate; the base's batched answers (left-padded, static cache) equal transformers' own greedy generate,
    one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.chat.generation import render_prompt, stop_token_ids
    from tunepipe.tasks.evaluate.task import evaluate_models
    from tunepipe.tasks.runtime.config import EvalConfig

    loaded, formatted, trained = gemma3_lora.loaded, gemma3_lora.formatted, gemma3_lora.trained
    cfg = EvalConfig(max_samples=3, max_new_tokens=24, batch_size=3)
    report = evaluate_models(
        formatted,
        loaded.eval_path,
        loaded.train_path,
        trained,
        gemma3,
        None,
        f"sqlite:///{tmp_path}/mlflow.db",
        gemma3_lora.data_cfg,
        cfg,
        tmp_path / "evaluate",
        tmp_path / "reference",
    )
    assert report.n_samples == 3
    assert report.candidate.metrics["eval_loss"] < report.base.metrics["eval_loss"]  # it learnt the pages

    samples = [json.loads(line) for line in report.samples_path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(gemma3.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(gemma3.name_or_path, dtype=torch.float32).eval()
    stops = stop_token_ids(model, tokenizer)
    for sample, example in zip(samples, [json.loads(line) for line in loaded.eval_path.read_text().splitlines()]):
        ids = torch.tensor([render_prompt(tokenizer, example["messages"][:-1])])
        with torch.inference_mode():
            tokens = model.generate(
                ids,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        end = next((k for k, token in enumerate(tokens) if token in stops), None)
        expected = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
        assert (sample["base"]["answer"], sample["base"]["stopped"]) == (expected, end is not None)


def test_a_prompt_and_answer_longer_than_gemmas_window_are_refused_naming_the_fix(gemma3) -> None:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from tunepipe.tasks.chat.generation import use_grouped_attention

    config = AutoConfig.from_pretrained(gemma3.name_or_path)
    config._attn_implementation = "sdpa"
    model = SimpleNamespace(config=config)  # the refusal comes before any weight is touched
    with pytest.raises(
        ValueError,
        match=r"sliding_attention layers are decoded here only when a prompt and its "
        r"answer \(513 tokens here\) fit their window \(512\).*eval.max_new_tokens",
    ):
        use_grouped_attention(model, config.sliding_window + 1)
