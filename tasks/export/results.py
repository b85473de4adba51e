"""What export and parity hand on: the GGUF files, and how each scores against the PyTorch model.

Plain models that import no stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from tunepipe.tasks.integrations.model_registry import MODEL_ARTIFACT
from tunepipe.tasks.runtime.records import Record


class GgufFile(BaseModel):
    type: str
    path: Path
    bytes: int
    sha256: str  # hex digest; Ollama names the blob `sha256:<this>`


class ExportResult(BaseModel):
    merged_dir: Path  # HF model + tokenizer: the merged LoRA model, or the fully fine-tuned one
    adapter_dir: Path | None  # None after full fine-tuning
    ggufs: list[GgufFile]  # in the order of `export.gguf_types`
    adapter_gguf: Path | None  # the LoRA adapter as GGUF, when LoRA-trained and `export.lora_gguf`

    def record(self) -> Record:
        """GGUF sizes; the merged model as the `model` artifact the registry points at."""
        return Record(
            metrics={f"export.{gguf.type}.bytes": gguf.bytes for gguf in self.ggufs},
            files=[(self.merged_dir, MODEL_ARTIFACT)],
            tags={"export.merged_dir": str(self.merged_dir)},
        )


class GgufScores(BaseModel):
    gguf_type: str
    scores: dict[str, float]  # split means, named as in tasks/chat/metrics.py; empty when the vocabulary check failed
    vocabulary_problem: str | None = None  # why the vocabulary check failed
    # Held-out prompts whose served token ids (Modelfile TEMPLATE + SYSTEM, GGUF vocabulary) differ from the ones
    # training rendered with the chat template: the served model then sees text it was not trained on.
    prompt_mismatches: int = 0


class ParityReport(BaseModel):
    n_samples: int
    ggufs: list[GgufScores]  # in the order of `export.gguf_types`
    samples_path: Path  # JSONL: expected answer, served prompt and each GGUF's answer per held-out example

    def record(self) -> Record:
        return Record(
            metrics={
                f"parity.{scores.gguf_type}.{name}": value
                for scores in self.ggufs
                for name, value in scores.scores.items()
            },
            files=[(self.samples_path, "parity")],
        )


class ParityVerdict(BaseModel):
    gguf_type: str
    passed: bool
    failures: list[str]  # one line per metric over its limit, or the vocabulary check's message


def verdicts_record(verdicts: list[ParityVerdict]) -> Record:
    """Which GGUFs passed, and why the others did not."""
    return Record(
        texts={"parity/verdicts.json": json.dumps([v.model_dump() for v in verdicts], indent=2)},
        tags={"parity.passed": ",".join(v.gguf_type for v in verdicts if v.passed) or "none"},
    )
