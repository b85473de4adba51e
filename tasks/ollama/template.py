"""A Hugging Face Jinja chat template translated to Ollama's Go TEMPLATE, with the stops that end a turn.

Supported families are recognised by their turn markers (ChatML, Llama 3, Gemma, Phi-3); anything else needs
`ollama.template` set by hand. The emitted template uses Ollama's `.Messages` form, so a system prompt sent
by a client and the Modelfile's SYSTEM reach the model the same way they did in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ChatFormat:
    """One family of chat templates: how a turn opens and closes, in the tokens the model was trained on."""

    name: str
    markers: tuple[str, ...]  # all of them occur in a Hugging Face template of this family
    turn_header: str  # opens a turn; `{role}` is replaced
    end_of_turn: str  # closes a turn, including any newline after it
    assistant_role: str = "assistant"
    excludes: tuple[str, ...] = ()  # markers of a look-alike family with a different layout
    system_in_first_user_turn: bool = False  # Gemma has no system turn: the prompt opens the first user turn

    @property
    def stop(self) -> str:
        return self.end_of_turn.strip()

    def header(self, role: str) -> str:
        return self.turn_header.replace("{role}", role)


CHAT_FORMATS = (
    # Phi-4 writes `<|im_start|>user<|im_sep|>` instead of ChatML's newline; it must not pass for ChatML.
    ChatFormat("ChatML", ("<|im_start|>", "<|im_end|>"), "<|im_start|>{role}\n", "<|im_end|>\n",
               excludes=("<|im_sep|>",)),
    ChatFormat("Llama 3", ("<|start_header_id|>", "<|eot_id|>"), "<|start_header_id|>{role}<|end_header_id|>\n\n",
               "<|eot_id|>"),
    ChatFormat("Gemma", ("<start_of_turn>", "<end_of_turn>"), "<start_of_turn>{role}\n", "<end_of_turn>\n",
               assistant_role="model", system_in_first_user_turn=True),
    ChatFormat("Phi-3", ("<|user|>", "<|end|>"), "<|{role}|>\n", "<|end|>\n"),
)


def detect_chat_format(chat_template: str) -> ChatFormat | None:
    """The first family whose markers all occur in the Hugging Face template, if any."""
    for fmt in CHAT_FORMATS:
        if all(m in chat_template for m in fmt.markers) and not any(m in chat_template for m in fmt.excludes):
            return fmt
    return None


def ollama_template(chat_template: str) -> tuple[str, list[str]]:
    """The Ollama Go TEMPLATE equivalent to a Hugging Face Jinja chat template, and its stop strings.

    Stops are the end-of-turn marker only: stopping on every special token cuts answers short (ollama#17939).
    """
    fmt = detect_chat_format(chat_template)
    if fmt is None:
        looked_for = "; ".join(f"{f.name} ({', '.join(f.markers)})" for f in CHAT_FORMATS)
        raise ValueError(
            f"unrecognised chat template: looked for the markers of {looked_for} and found none of these sets. "
            "Set `ollama.template` in the config to an Ollama Go template for this model "
            "(https://github.com/ollama/ollama/blob/main/docs/template.mdx)."
        )
    return _go_template(fmt), [fmt.stop]


def _go_template(fmt: ChatFormat) -> str:
    """Ollama's `.Messages` form, laid out like its official qwen2.5 and llama3.2 templates.

    Ollama collects every system message into `.System` (and the Modelfile's SYSTEM when the request has none)
    but also leaves them in `.Messages`, so the loop renders user and assistant turns only. A final assistant
    message is left open, so a caller can have the model continue it; otherwise the assistant turn is opened.
    """
    user, assistant, end = fmt.header("user"), fmt.header(fmt.assistant_role), fmt.end_of_turn
    if fmt.system_in_first_user_turn:
        system = "{{- $system := .System }}\n"
        user += '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    else:
        system = "{{- if .System }}" + fmt.header("system") + "{{ .System }}" + end + "{{ end }}\n"
    # After each `end` comes an action without `{{-`, which would also trim the newline that ends the turn.
    return (
        system
        + "{{- range $i, $_ := .Messages }}\n"
        + "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        + '{{- if eq .Role "user" }}' + user + "{{ .Content }}" + end
        + '{{ else if eq .Role "assistant" }}' + assistant + "{{ .Content }}{{ if not $last }}" + end
        + "{{ end }}{{ end }}\n"
        + '{{- if and (ne .Role "assistant") $last }}' + assistant + "{{ end }}\n"
        + "{{- end }}"
    )


def default_system_prompt(chat_template: str, fmt: ChatFormat) -> str | None:
    """The system prompt the template adds to a conversation that has none (Qwen2.5: "You are Qwen, ...")."""
    if fmt.system_in_first_user_turn:
        return None
    rendered = render_chat_template(chat_template, [{"role": "user", "content": "?"}])
    head = fmt.header("system")
    return rendered[len(head):].partition(fmt.end_of_turn)[0] if rendered.startswith(head) else None


def render_chat_template(chat_template: str, messages: list[dict[str, str]]) -> str:
    """Render as transformers does, in the Jinja environment its chat-template docs specify.

    Importing transformers for this would add seconds to every run, cached ones included.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )
