"""The one typed config that drives a tunepipe run, loaded from YAML.

Every stage reads only its own section, so a task's cache key can hash exactly the part of the config
it depends on: changing the `gate` rules does not invalidate training or evaluation.

One module per section, named as in the YAML (data, model and lora, train, eval, gate, retrain, export, ollama,
rag); the whole config, its loading and its schema in `pipeline`. Every name is imported from here.
"""

from tunepipe.tasks.runtime.config.data import DataConfig
from tunepipe.tasks.runtime.config.evaluate import (
    COMMON_METRICS,
    DEFAULT_RUBRIC,
    JSON_METRICS,
    JUDGE_METRICS,
    LOWER_IS_BETTER,
    TEXT_METRICS,
    EvalConfig,
    JudgeConfig,
    RetentionConfig,
)
from tunepipe.tasks.runtime.config.export import ExportConfig, GgufType
from tunepipe.tasks.runtime.config.gate import GateConfig, MetricRule, RetentionRule
from tunepipe.tasks.runtime.config.model import LoraConfig, ModelConfig
from tunepipe.tasks.runtime.config.ollama import OllamaConfig
from tunepipe.tasks.runtime.config.pipeline import (
    ConfigError,
    PipelineConfig,
    RetryConfig,
    TrackingConfig,
    json_schema,
    load_config,
)
from tunepipe.tasks.runtime.config.rag import RagColumns, RagConfig
from tunepipe.tasks.runtime.config.retrain import RetrainChange, RetrainConfig
from tunepipe.tasks.runtime.config.section import Section
from tunepipe.tasks.runtime.config.train import EarlyStopping, PreferenceConfig, TrainConfig

__all__ = [
    "COMMON_METRICS",
    "DEFAULT_RUBRIC",
    "JSON_METRICS",
    "JUDGE_METRICS",
    "LOWER_IS_BETTER",
    "TEXT_METRICS",
    "ConfigError",
    "DataConfig",
    "EarlyStopping",
    "EvalConfig",
    "ExportConfig",
    "GateConfig",
    "GgufType",
    "JudgeConfig",
    "LoraConfig",
    "MetricRule",
    "ModelConfig",
    "OllamaConfig",
    "PipelineConfig",
    "PreferenceConfig",
    "RagColumns",
    "RagConfig",
    "RetentionConfig",
    "RetentionRule",
    "RetrainChange",
    "RetrainConfig",
    "RetryConfig",
    "Section",
    "TrackingConfig",
    "TrainConfig",
    "json_schema",
    "load_config",
]
