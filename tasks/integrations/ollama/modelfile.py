"""What the Modelfile says, as data: written to disk and sent to /api/create alike, so they cannot differ.

Template and stops come from the trained model's tokenizer folder (derived and proven:
tasks/integrations/ollama/template.py); the system prompt is the one the model was trained with
(`ollama.system`, else `data.system_prompt`, else the chat template's own default).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.integrations.ollama.template import (
    TemplateRefused,
    end_of_turn,
    ollama_template,
    transformers_renderer,
)

log = logging.getLogger(__name__)

DEFAULT_CHAT = ChatContext()  # frozen: one shared default for `modelfile_spec(chat=...)`


class ModelfileSpec(BaseModel):
    """What the Modelfile says, as data: written to disk and sent to /api/create alike, so they cannot differ."""

    model_config = ConfigDict(frozen=True)

    gguf: Path  # the model's weights (FROM); with `adapter`, they are only the base the adapter applies to
    template: str
    stops: list[str]
    parameters: dict[str, int | float]  # every PARAMETER but `stop`
    system: str | None = None
    adapter: Path | None = None  # a LoRA adapter GGUF: the FROM base + ADAPTER route
    base: str | None = None  # FROM of the adapter route when it is an Ollama model name rather than a path

    def api_parameters(self) -> dict[str, Any]:
        """The `parameters` field of /api/create."""
        return {"stop": list(self.stops), **self.parameters}

    def render(self, folder: Path) -> str:
        """Modelfile text for a Modelfile in `folder`: FROM is relative when the GGUF lies inside it."""
        source = self.base or _relative(self.gguf, folder)
        lines = [f"FROM {source if _bare(source) else _quoted(source, 'the FROM path')}"]
        if self.adapter is not None:
            adapter = _relative(self.adapter, folder)
            lines.append(f"ADAPTER {adapter if _bare(adapter) else _quoted(adapter, 'the adapter path')}")
        lines.append(f'TEMPLATE """{_checked(self.template, "the template")}"""')
        if self.system is not None:
            lines.append(f'SYSTEM """{_checked(self.system, "the system prompt")}"""')
        lines += [f"PARAMETER stop {_quoted(stop, 'a stop string')}" for stop in self.stops]
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def write(self, out_path: Path) -> Path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(self.render(out_path.parent), encoding="utf-8")
        return out_path


def _relative(path: Path, folder: Path) -> str:
    """`./name` for a file inside the Modelfile's folder (the folder then moves as a whole), else absolute."""
    path, folder = path.resolve(), folder.resolve()
    return f"./{path.relative_to(folder).as_posix()}" if path.is_relative_to(folder) else str(path)


# Ollama's Modelfile parser has no escapes: a value is bare (no spaces), "quoted" or """triple-quoted""",
# and a triple-quoted value ends at the first `"""` followed by whitespace. So `"""` inside a value is refused.
def _checked(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f'{what} contains """, which a Modelfile cannot hold (its parser has no escapes)')
    return value


def _quoted(value: str, what: str) -> str:
    _checked(value, what)
    return f'"""{value}"""' if any(c in value for c in '"\r\n') else f'"{value}"'


def _bare(value: str) -> bool:
    return bool(value) and not any(c.isspace() or c == '"' for c in value)


def modelfile_spec(
    gguf_path: Path,
    tokenizer_dir: Path,
    *,
    template: str | None = None,
    system: str | None = None,
    trained_system: str | None = None,
    parameters: dict[str, int | float] | None = None,
    examples: Sequence[Sequence[dict[str, str]]] = (),
    chat: ChatContext = DEFAULT_CHAT,
) -> ModelfileSpec:
    """Template and stops derived from the tokenizer's chat template and proven (or the given `template`: the
    config's `ollama.template`), with these PARAMETERs; `examples` (prompts of the run's conversations) join the
    proof, which renders the chat template with training's `chat` context (data.reasoning's enable_thinking,
    training's date). `OllamaConfig.modelfile_settings()` gives `template`, `system` and `parameters`.

    The stops hold every token the trained model may end a turn with, end-of-turn text first: what the chat
    template has the model write after an answer, the tokenizer's eos token, and generation_config.json's eos
    ids (a Qwen fine-tune ending turns with <|endoftext|> rambled past <|im_end|>). No other special token:
    those cut answers short. The system prompt is what training put before every conversation, so a client
    that sends none gets the prompt the model learned under: `system` (`ollama.system`) when set, else `trained_system`
    (`data.system_prompt`), else (for a derived template) the one the chat template adds by default.
    """
    chat_template, eos = _read_tokenizer(tokenizer_dir)
    system = system if system is not None else trained_system
    if chat_template is None and template is None:
        raise ValueError(
            f"{tokenizer_dir}: no chat template (looked for chat_template.jinja and `chat_template` in "
            "tokenizer_config.json); set `ollama.template` in the config to an Ollama Go template."
        )
    render = transformers_renderer(chat_template, eos_token=eos or "", chat=chat) if chat_template else None
    if template is not None:
        turn_end = end_of_turn(render) if render else None
        stops = [turn_end] if turn_end else []
    else:
        try:
            served = ollama_template(render, system, examples, chat.reasoning)
        except TemplateRefused as exc:
            raise TemplateRefused(f"{tokenizer_dir}: {exc}") from exc
        template, stops = served.template, served.stops
        if system is None:  # the template's own default is what training rendered then
            system = served.default_system
    end_tokens = [eos] if eos else []
    # dict.fromkeys drops repeats and keeps the first occurrence's place: the end-of-turn text stays first.
    stops = list(dict.fromkeys([*stops, *end_tokens, *_generation_eos_tokens(tokenizer_dir)]))
    return ModelfileSpec(gguf=gguf_path, template=template, stops=stops, system=system, parameters=parameters or {})


def client_messages(prompt, system: str | None) -> list[dict[str, str]]:
    """What a client sends for `prompt` (messages): no system prompt when it is the Modelfile's SYSTEM, which
    Ollama adds itself."""
    messages = [m.model_dump() for m in prompt]
    if messages and messages[0]["role"] == "system" and messages[0]["content"] == system:
        messages = messages[1:]
    return messages


def _read_tokenizer(tokenizer_dir: Path) -> tuple[str | None, str | None]:
    """The chat template and eos token a saved Hugging Face tokenizer folder holds."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    jinja_file = tokenizer_dir / "chat_template.jinja"  # where transformers saves it now; it takes precedence
    chat_template = jinja_file.read_text(encoding="utf-8") if jinja_file.exists() else config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # a serialised AddedToken
        eos = eos.get("content")
    return chat_template, eos


def _generation_eos_tokens(model_dir: Path) -> list[str]:
    """The tokens behind generation_config.json's `eos_token_id` (an int or a list), which generation stops on.

    Ids map to text through tokenizer.json: its `added_tokens` first (where special tokens live), else the vocab.
    """
    config_file = model_dir / "generation_config.json"
    if not config_file.exists():
        return []
    eos_ids = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token_id")
    if eos_ids is None:
        return []
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    tokens = _token_texts(model_dir / "tokenizer.json")
    missing = [i for i in ids if i not in tokens]
    if missing:  # a slow-tokenizer-only folder, say; the template's marker and eos token still stop it
        log.warning("%s: eos token ids %s not found in tokenizer.json; no stop added for them", model_dir, missing)
    return [tokens[i] for i in ids if i in tokens]


def _token_texts(tokenizer_file: Path) -> dict[int, str]:
    """Token id → text from a fast tokenizer's tokenizer.json; empty when there is none."""
    if not tokenizer_file.exists():
        return {}
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = tokenizer.get("model", {}).get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [text, score] pairs, indexed by id
        texts = {i: entry[0] for i, entry in enumerate(vocab)}
    else:  # BPE, WordPiece: text → id
        texts = {i: text for text, i in vocab.items()}
    texts.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    return texts
