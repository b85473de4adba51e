"""`export:`: the GGUF types written and the parity limits that decide which one is served."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tunepipe.tasks.runtime.config.section import Section

GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class ExportConfig(Section):
    # Export writes files; the parity limits only decide which of them are served.
    cache_exclude: ClassVar[set[str]] = {"max_drop", "max_drop_by_type"}

    gguf_types: list[GgufType] = Field(
        ["q8_0"],
        min_length=1,
        description="GGUF types to export; each is re-evaluated (parity) and the smallest one within "
        "`max_drop` is registered in Ollama. Replaces the old single `gguf_quantization`.",
    )
    lora_gguf: bool = Field(
        True,
        description="Also write the LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py) with a "
        "`Modelfile.adapter` for Ollama's FROM base + ADAPTER route (LoRA training only).",
    )
    max_drop: dict[str, float] = Field(
        {"exact_match": 0.02, "valid_json_rate": 0.02, "stop_rate": 0.02},
        description="Parity: the largest drop of each metric (tasks/chat/metrics.py names) a GGUF may show against "
        "the PyTorch model on the held-out examples; a GGUF over any limit is not registered.",
    )
    max_drop_by_type: dict[GgufType, dict[str, float]] = Field(
        {},
        description="Per-type parity limits overriding `max_drop` metric by metric, e.g. "
        "{q4_k_m: {exact_match: 0.05}}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_gguf_quantization(cls, raw: Any) -> Any:
        """Configs written before `gguf_types` named one type as `gguf_quantization`; read it as a list of one."""
        if isinstance(raw, dict) and "gguf_quantization" in raw:
            raw = dict(raw)
            old = raw.pop("gguf_quantization")
            if "gguf_types" in raw:
                raise ValueError("set `gguf_types` only; `gguf_quantization` is its old single-type form")
            warnings.warn(
                "export.gguf_quantization is deprecated: write `gguf_types: [" + str(old) + "]`",
                DeprecationWarning,
                stacklevel=2,
            )
            raw["gguf_types"] = [old]
        return raw

    def drop_limits(self, gguf_type: str) -> dict[str, float]:
        return {**self.max_drop, **self.max_drop_by_type.get(gguf_type, {})}
