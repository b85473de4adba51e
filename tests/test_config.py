"""The typed config: loading, strict validation with YAML paths in errors, `--set` overrides, JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunepipe.tasks.runtime.config import ConfigError, PipelineConfig, json_schema, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SECTIONS = {"data", "model", "lora", "train", "eval", "export", "ollama", "tracking"}


def _write(tmp_path: Path, change: dict) -> Path:
    """The demo config with `change` merged in (one level deep per section), written to tmp_path."""
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_config_loads() -> None:
    cfg = load_config(CONFIGS / "demo.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == "demo-products"
    assert cfg.model.base.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.train.max_steps == 8 and cfg.train.mode == "lora"
    assert cfg.model.max_seq_length == 256
    assert cfg.gate.rules["valid_json_rate"].min == 0.9
    assert cfg.gate.rules["valid_json_rate"].max is None
    assert cfg.gate.rules["field_accuracy"].min_improvement_over_base == 0.5
    assert cfg.retrain.max_attempts == 2
    assert cfg.retrain.plan[0].continue_training and cfg.retrain.plan[0].max_steps == 8


def test_training_modes_and_adapter_targets(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            {
                "train": {"mode": "qlora", "max_steps": None, "epochs": 2},
                "lora": {"target_modules": "all-linear", "use_rslora": True},
            },
        )
    )
    assert (cfg.train.mode, cfg.train.max_steps, cfg.train.epochs) == ("qlora", None, 2)
    assert cfg.lora.target_modules == "all-linear" and cfg.lora.use_rslora
    with pytest.raises(ConfigError, match="load_in_4bit cannot train every weight"):
        load_config(_write(tmp_path, {"model": {"load_in_4bit": True}, "train": {"mode": "full"}}))


def test_qwen_config_loads() -> None:
    cfg = load_config(CONFIGS / "qwen2.5-0.5b.yaml")
    assert cfg.model.base == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.model.load_in_4bit is True
    assert cfg.train.lr_scheduler == "cosine"
    assert cfg.gate.rules["exact_match"].min == pytest.approx(0.8)
    assert cfg.tracking.experiment == "tunepipe"  # section absent from the file: defaults apply


@pytest.mark.parametrize(
    ("change", "yaml_path"),
    [
        ({"nmae": "typo"}, "nmae"),
        ({"train": {"max_stepz": 10}}, "train.max_stepz"),
        ({"gate": {"rules": {"exact_match": {"mn": 0.5}}}}, "gate.rules.exact_match.mn"),
    ],
)
def test_unknown_key_names_its_yaml_path_and_the_file(tmp_path: Path, change: dict, yaml_path: str) -> None:
    path = _write(tmp_path, change)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert yaml_path in message
    assert path.name in message


def test_wrong_type_names_its_yaml_path(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match=r"train\.max_steps") as excinfo:
        load_config(path)
    assert path.name in str(excinfo.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_overrides_are_parsed_as_yaml_values() -> None:
    cfg = load_config(
        CONFIGS / "demo.yaml",
        ["train.max_steps=20", "gate.rules.valid_json_rate.max=1.0", "model.load_in_4bit=true", "train.mode=qlora"],
    )
    assert cfg.train.max_steps == 20 and type(cfg.train.max_steps) is int
    assert cfg.gate.rules["valid_json_rate"].max == 1.0
    assert cfg.model.load_in_4bit is True
    assert cfg.gate.rules["valid_json_rate"].min == 0.9  # siblings of an overridden key are kept


def test_override_can_fill_a_section_absent_from_the_file() -> None:
    cfg = load_config(CONFIGS / "qwen2.5-0.5b.yaml", ["tracking.experiment=other"])
    assert cfg.tracking.experiment == "other"


@pytest.mark.parametrize(
    ("override", "yaml_path"),
    [
        ("gate.rules.exact_match.mn=0.5", "gate.rules.exact_match.mn"),
        ("train.new_section.depth=3", "train.new_section"),
    ],
)
def test_unknown_nested_key_in_an_override_fails(override: str, yaml_path: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(CONFIGS / "demo.yaml", [override])
    assert f"{yaml_path}: Extra inputs are not permitted" in str(excinfo.value)


def test_override_without_equals_sign_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE") as excinfo:
        load_config(CONFIGS / "demo.yaml", ["foo"])
    assert "'foo'" in str(excinfo.value)


def test_override_through_a_scalar_fails() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps is not a section"):
        load_config(CONFIGS / "demo.yaml", ["train.max_steps.value=3"])


def test_json_schema_is_json_with_every_section() -> None:
    schema = json.loads(json_schema())
    assert set(schema["properties"]) >= SECTIONS
    assert {"name", "data", "model", "ollama"} <= set(schema["required"])


def test_committed_schema_matches_the_code() -> None:
    committed = CONFIGS / "tunepipe.schema.json"
    assert committed.read_text() == json_schema(), (
        "configs/tunepipe.schema.json is stale: run `tunepipe schema -o configs/tunepipe.schema.json`"
    )


def test_preference_objective_and_ratings(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, {"train": {"objective": "sft+dpo", "preference": {"beta": 0.3}}, "rag": {"max_bad_rating": 2}})
    )
    assert (cfg.train.objective, cfg.train.preference.beta, cfg.rag.max_bad_rating) == ("sft+dpo", 0.3, 2)
    with pytest.raises(ConfigError, match=r"max_bad_rating \(4.0\) must be below min_rating \(4.0\)"):
        load_config(_write(tmp_path, {"rag": {"max_bad_rating": 4}}))
    with pytest.raises(ConfigError, match="train.objective"):
        load_config(_write(tmp_path, {"train": {"objective": "orpo"}}))
