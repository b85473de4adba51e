"""The whole config (`PipelineConfig`: every section, `tracking:` and `retry:`), read from YAML with
`--set` overrides, and its JSON schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_serializer, model_validator

from tunepipe.tasks.runtime.config.data import DataConfig
from tunepipe.tasks.runtime.config.evaluate import (
    COMMON_METRICS,
    JSON_METRICS,
    JUDGE_METRICS,
    TEXT_METRICS,
    EvalConfig,
    JudgeConfig,
)
from tunepipe.tasks.runtime.config.export import ExportConfig
from tunepipe.tasks.runtime.config.gate import GateConfig
from tunepipe.tasks.runtime.config.model import LoraConfig, ModelConfig
from tunepipe.tasks.runtime.config.ollama import OllamaConfig
from tunepipe.tasks.runtime.config.rag import RagConfig
from tunepipe.tasks.runtime.config.retrain import RetrainConfig
from tunepipe.tasks.runtime.config.section import Section, masked
from tunepipe.tasks.runtime.config.train import TrainConfig


class TrackingConfig(Section):
    uri: str = Field("sqlite:///runs/mlflow.db", description="MLflow tracking URI.")
    _mask_uri = field_serializer("uri", when_used="json")(lambda self, value: masked(value))
    experiment: str = "tunepipe"
    artifact_location: str = Field("runs/mlartifacts", description="Where a new experiment stores artifacts.")


class RetryConfig(Section):
    """Retries of the tasks that talk to the network: hub resolution, Ollama and the MLflow model registry."""

    attempts: int = Field(
        4,
        ge=1,
        description="Tries in all of such a task when its call failed transiently (no answer, a "
        "connection cut off, HTTP 429 or 5xx); 1: no retry. Each task is safe to repeat.",
    )
    backoff_s: float = Field(
        5.0, ge=0, description="Wait before the first retry, in seconds; each later one waits twice as long."
    )


class PipelineConfig(Section):
    name: str = Field(description="Name of this pipeline; MLflow run names start with it.")
    workdir: Path = Field(Path("runs"), description="Root of every output: stage results, exports, quarantine.")
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    retrain: RetrainConfig = RetrainConfig()
    export: ExportConfig = ExportConfig()
    ollama: OllamaConfig
    tracking: TrackingConfig = TrackingConfig()
    retry: RetryConfig = RetryConfig()
    rag: RagConfig | None = Field(None, description="Accumulated RAG examples for scheduled retraining.")

    @model_validator(mode="after")
    def _full_fine_tuning_needs_a_16_bit_base(self) -> PipelineConfig:
        if self.model.load_in_4bit and self.train.mode == "full":
            raise ValueError("model.load_in_4bit cannot train every weight: use train.mode qlora (or lora)")
        return self

    @model_validator(mode="after")
    def _gate_metrics_exist(self) -> PipelineConfig:
        """Every metric a rule or the retrain loop names must be one the evaluation reports for this data."""
        known = COMMON_METRICS | (JSON_METRICS if self.data.output_format == "json" else TEXT_METRICS)
        judged = {self.eval.judge.metric} if self.eval.judge is not None else set()
        named = [
            *((f"gate.rules.{m}", m) for m in self.gate.rules),
            *((f"gate.must_beat_champion_by.{m}", m) for m in self.gate.must_beat_champion_by),
        ]
        for where, metric in named:
            per_field = self.data.output_format == "json" and metric.startswith("field_accuracy.")
            if metric not in known | judged and not per_field:
                raise ValueError(
                    f"{where}: unknown metric {metric!r} for {self.data.output_format} answers; "
                    f"known: {', '.join(sorted(known | judged))}, field_accuracy.<key>"
                    + _judge_hint(metric, self.eval.judge)
                )
        metric = self.retrain.metric
        if metric not in known and not (self.data.output_format == "json" and metric.startswith("field_accuracy.")):
            # The judge measures only the report the gate reads, never the attempts the loop compares.
            raise ValueError(
                f"retrain.metric: unknown metric {metric!r} for {self.data.output_format} answers; "
                f"known: {', '.join(sorted(known))}, field_accuracy.<key>"
            )
        return self

    @model_validator(mode="after")
    def _retention_rule_has_prompts(self) -> PipelineConfig:
        if self.gate.retention is not None and self.eval.retention.builtin == 0 and self.eval.retention.prompts is None:
            raise ValueError(
                "gate.retention needs general prompts to decide on: set eval.retention.builtin above 0 "
                "or eval.retention.prompts, or set gate.retention to null"
            )
        return self


def _judge_hint(metric: str, judge: JudgeConfig | None) -> str:
    """Why a judge metric is unknown: no judge, or a judge of the other mode."""
    modes = {name: mode for mode, name in JUDGE_METRICS.items()}
    if metric not in modes:
        return ""
    if judge is None:
        return f" ({metric} is the judge's: set eval.judge)"
    return f" ({metric} is written in eval.judge.mode {modes[metric]}; this judge's mode is {judge.mode})"


class ConfigError(ValueError):
    """A config file that cannot be used, with the YAML path of every offending key."""


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read YAML from `path`, apply `section.key=value` overrides, and validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(problems)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """`train.max_steps=20` sets raw['train']['max_steps'] = 20; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or a key whose lines are all commented out
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(value)


def json_schema() -> str:
    """JSON schema of the config, for editor completion and validation of YAML files."""
    return json.dumps(PipelineConfig.model_json_schema(), indent=2) + "\n"
