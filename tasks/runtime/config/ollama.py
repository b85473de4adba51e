"""`ollama:`: where and how the model is registered and served."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_serializer

from tunepipe.tasks.runtime.config.section import Section, masked


class OllamaConfig(Section):
    model_name: str = Field(description="Name registered in Ollama (a `:latest` tag is implied).")
    host: str | None = Field(None, description="Ollama base URL; defaults to $OLLAMA_HOST or http://127.0.0.1:11434.")
    _mask_host = field_serializer("host", when_used="json")(lambda self, value: masked(value))
    num_ctx: int = Field(4096, ge=256)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(600, gt=0, description="How long a blob upload or create may take.")
    template: str | None = Field(
        None, description="Ollama Go TEMPLATE overriding the one derived from the chat template."
    )
    system: str | None = Field(
        None,
        description="System prompt written into the Modelfile (SYSTEM); defaults to `data.system_prompt`, "
        "the one the model was trained with, else the chat template's own default.",
    )
    smoke_examples: int = Field(
        5,
        ge=0,
        description="Held-out examples asked through /api/chat after registration (with the probes); "
        "each answer must parse as the task demands and end by a stop, or nothing is promoted.",
    )
    adapter_base: str | None = Field(
        None,
        description="FROM line of `Modelfile.adapter` (an Ollama model such as qwen2.5:0.5b-instruct, or a "
        "path); defaults to the base model's local folder, which Ollama imports as safetensors.",
    )

    def modelfile_settings(self) -> dict[str, Any]:
        """What the Modelfile takes from this section, as `modelfile_spec`'s keywords."""
        return {
            "template": self.template,
            "system": self.system,
            "parameters": {"num_ctx": self.num_ctx, "temperature": self.temperature},
        }
