"""General prompts outside the task, the questions retention is measured on: a built-in set in several languages
(general_prompts.jsonl, shipped with the package) and the user's own file (`eval.retention.prompts`).

A line is `{"prompt": "..."}` or `{"messages": [...]}` (OpenAI-style, ending with a user turn), with an optional
`id` and `language`. Read when the config loads, so a bad line stops a run before any training, named by file
and line. Imports no stage and no config: the config's validator calls it while the config module loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tunepipe.tasks.chat.examples import Message


class PromptsConfig(Protocol):
    """What `read_prompts` reads of `eval.retention` (tunepipe.tasks.runtime.config.RetentionConfig, which calls it)."""

    builtin: int
    prompts: Path | None


BUILTIN = Path(__file__).with_name("general_prompts.jsonl")


class GeneralPrompt(BaseModel):
    id: str
    source: str  # file:line
    language: str | None = None
    messages: list[Message]  # ends with the user's turn

    @property
    def prompt(self) -> str:
        return self.messages[-1].content


class _Line(BaseModel):
    """One line as written: a prompt or a conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    language: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_question(self) -> _Line:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` (a string) or `messages` (a conversation), not both or neither")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` is empty")
        if self.messages is not None:
            if not self.messages or self.messages[-1].role != "user":
                raise ValueError("`messages` must end with a user turn: the question the models answer")
            if any(not m.content.strip() for m in self.messages):
                raise ValueError("`messages` has an empty turn")
        return self


class GeneralPromptsError(ValueError):
    """A prompts file with lines that cannot be asked; the message names each by file and line."""


def read_prompts(cfg: PromptsConfig) -> list[GeneralPrompt]:
    """The first `cfg.builtin` built-in prompts, then every line of `cfg.prompts`."""
    builtin = read_file(BUILTIN)
    if cfg.builtin > len(builtin):
        raise GeneralPromptsError(
            f"eval.retention.builtin is {cfg.builtin}, but there are {len(builtin)} built-in "
            "prompts; give your own in eval.retention.prompts"
        )
    return builtin[: cfg.builtin] + (read_file(cfg.prompts) if cfg.prompts is not None else [])


def read_file(path: Path) -> list[GeneralPrompt]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GeneralPromptsError(f"eval.retention.prompts: cannot read {path}: {exc}") from exc
    prompts, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = _Line.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not a JSON object ({exc.msg})")
            continue
        except ValidationError as exc:
            problems += [f"{where}: {'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()]
            continue
        messages = row.messages or [Message(role="user", content=row.prompt)]
        prompts.append(
            GeneralPrompt(
                id=row.id or f"{Path(path).name}:{number}", source=where, language=row.language, messages=messages
            )
        )
    if problems:
        raise GeneralPromptsError("eval.retention.prompts: lines that cannot be asked:\n  " + "\n  ".join(problems))
    if not prompts:
        raise GeneralPromptsError(f"eval.retention.prompts: {path} holds no prompt")
    return prompts
