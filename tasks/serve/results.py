"""What the serving stages hand on: the serving plan, the registration and the smoke test's report.

Plain models that import no stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, field_serializer

from tunepipe.tasks.chat.metrics import OutputFormat
from tunepipe.tasks.export.results import GgufFile
from tunepipe.tasks.integrations.ollama.modelfile import ModelfileSpec
from tunepipe.tasks.runtime.config import OllamaConfig, RetryConfig
from tunepipe.tasks.runtime.records import Record
from tunepipe.tasks.runtime.redact import redact

PLAN_ARTIFACT = "serving/plan.json"


class SmokeCase(BaseModel):
    name: str
    messages: list[dict[str, str]]  # what a client sends: the Modelfile's SYSTEM stands in for the trained one


class ServingPlan(BaseModel):
    run_id: str
    tracking_uri: str
    # Prefect stores the plan (a subflow parameter) and MLflow keeps it as an artifact: JSON never carries a
    # credential of the URI; the running flow keeps the real value, and `load_plan` is given it again.
    _mask_uri = field_serializer("tracking_uri", when_used="json")(lambda self, value: redact(value))
    registered_model: str  # MLflow registered model: the pipeline's name
    dataset_fingerprint: str
    gguf: GgufFile
    spec: ModelfileSpec
    modelfile: Path
    ollama: OllamaConfig
    output_format: OutputFormat
    required_keys: list[str]
    max_new_tokens: int
    smoke_cases: list[SmokeCase]
    retry: RetryConfig = RetryConfig()  # a plan logged before retries existed gets the defaults

    def record(self) -> Record:
        """The Modelfile, and the plan itself, from which `tunepipe register RUN_ID` finishes a run later."""
        return Record(
            files=[(self.modelfile, "ollama")],
            texts={PLAN_ARTIFACT: self.model_dump_json(indent=2)},
            tags={
                "export.gguf_path": str(self.gguf.path),
                "gguf.type": self.gguf.type,
                "ollama.model": self.ollama.model_name,
            },
        )


class Registration(BaseModel):
    state: Literal["registered", "unreachable"]
    message: str  # what happened, or how to finish later
    host: str
    version: str | None = None  # the MLflow model version
    ollama_tag: str | None = None  # NAME:VERSION


class SmokeResult(BaseModel):
    case: str
    answer: str
    done_reason: str | None
    problems: list[str]


class SmokeReport(BaseModel):
    results: list[SmokeResult]

    @property
    def passed(self) -> bool:
        return all(not r.problems for r in self.results)

    def summary(self) -> str:
        failed = [f"{r.case}: {'; '.join(r.problems)}" for r in self.results if r.problems]
        return f"{len(self.results) - len(failed)}/{len(self.results)} answers passed" + (
            ": " + " | ".join(failed) if failed else ""
        )
