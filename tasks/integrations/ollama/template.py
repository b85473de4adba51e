"""A Hugging Face Jinja chat template translated to Ollama's Go TEMPLATE, derived from the template and proven.

No table of families: the chat template is rendered (as transformers renders it for training) on probe
conversations whose contents are unique markers, and the text around each marker tells what the template
writes before a system prompt, between the turns of each pair of roles, and after the last user turn (the
generation prompt). Constant text (a date line, a default system prompt) comes along as part of that text.
The system prompt either precedes the conversation (its own turn, or the start of the first user turn) or
opens the last user turn (Mistral); anything else is refused.

The translation is accepted only when Ollama's rendering (Go's own text/template, filled as Ollama's server
fills it: tasks/integrations/ollama/render.py) equals transformers' for a fixed set of conversations plus the run's own
system prompt and examples; otherwise it is refused with the first difference and what to set instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from tunepipe.tasks.chat.template import (
    AnswerRefused,
    ChatRenderer,
    Reasoning,
    check_probe_answer,
)
from tunepipe.tasks.chat.template import (  # re-exported: the Ollama side imports it from here
    transformers_renderer as transformers_renderer,
)
from tunepipe.tasks.integrations.ollama.render import render_served_prompt

SET_INSTEAD = (
    "Set `ollama.template` in the config to an Ollama Go template for this model "
    "(https://github.com/ollama/ollama/blob/main/docs/template.mdx)."
)

# Probe contents: plain words no template alters, each unique, so a marker's place in the rendering is certain.
S, U1, A1, U2 = "SYSPROBE", "USERPROBE1", "ASSISTANTPROBE1", "USERPROBE2"

# The fixed conversations of the proof: single and several turns, markup and JSON, newlines, non-ASCII text.
PROOF_SYSTEM = "You extract product facts as JSON.\nAnswer with one object."
PROOF_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "<p>Kettle, 1.7 l, steel</p>"},),
    (
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": '{"answer": 4}'},
        {"role": "user", "content": "And 3 × 3?\nReply in JSON."},
    ),
    (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": '{\n  "d": [1, 2]\n}'},
        {"role": "user", "content": "Größe: 42 — «ok»"},
    ),
)


class TemplateRefused(ValueError):
    """The chat template cannot be served as Ollama TEMPLATE; the message says why and what to set instead."""


@dataclass(frozen=True)
class ServedTemplate:
    template: str  # Ollama Go TEMPLATE (`.Messages` form)
    stops: list[str]  # the text that ends an assistant turn, as the model was trained to write it
    default_system: str | None  # the system prompt the chat template adds when a conversation has none


def ollama_template(
    render: ChatRenderer,
    system_prompt: str | None = None,
    examples: Sequence[Sequence[dict[str, str]]] = (),
    reasoning: Reasoning = "keep",
) -> ServedTemplate:
    """The Ollama TEMPLATE equivalent to `render`, proven on the fixed conversations and `examples` (prompts
    ending with a user turn) under `system_prompt`, for a model trained under `data.reasoning` `reasoning`
    (render with the same ChatContext); raises TemplateRefused otherwise."""
    layout = _probe(render)
    served = ServedTemplate(
        template=layout.go_template(),
        stops=[layout.end_of_turn] if layout.end_of_turn else [],
        default_system=layout.default_system,
    )
    _prove(render, served, system_prompt, examples)
    _check_reasoning(render, reasoning)
    return served


def end_of_turn(render: ChatRenderer) -> str | None:
    """The text closing an assistant turn (for a hand-written `ollama.template`'s stops), when the probes find it."""
    try:
        return _probe(render).end_of_turn or None
    except TemplateRefused:
        return None


@dataclass(frozen=True)
class _Layout:
    """The text a chat template writes around each turn, read off the probe renderings."""

    system_first: bool  # the system prompt precedes the conversation; else it opens the last user turn
    before_system: str  # before the system prompt, when it precedes the conversation
    before_user: dict[str, str]  # text before a user turn, by the role before it ("" at the start)
    before_assistant: str  # between a user turn and the assistant's answer
    generation_prompt: str  # after the last user turn
    end_of_turn: str  # what the model writes after its answer (a stop string; see _end_of_turn)
    # System prompt opening the last user turn: the text before it, by the role before, and after it.
    before_last_system: dict[str, str] = field(default_factory=dict)
    after_last_system: str = ""
    default_system: str | None = None

    def go_template(self) -> str:
        """Go TEMPLATE: every line starts with `{{-` and ends with an action, so only our layout is trimmed."""
        lines = ['{{- $prev := "" }}']
        if self.system_first:
            lines.append(
                f"{{{{- if .System }}}}{_lit(self.before_system)}{{{{ .System }}}}"
                '{{ $prev = "system" }}{{ end }}'
            )
        lines += ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
        user = '{{- if eq .Role "user" }}'
        if not self.system_first:
            user += (
                "{{ if and $last $.System }}"
                + _by_prev(self.before_last_system)
                + f"{{{{ $.System }}}}{_lit(self.after_last_system)}{{{{ else }}}}"
                + _by_prev(self.before_user)
                + "{{ end }}"
            )
        else:
            user += _by_prev(self.before_user)
        user += (
            f'{{{{ .Content }}}}{{{{ if $last }}}}{_lit(self.generation_prompt)}{{{{ end }}}}{{{{ $prev = "user" }}}}'
        )
        # A final answer is left open (no end of turn), so a client can have the model continue it.
        lines += [
            user,
            f'{{{{- else if eq .Role "assistant" }}}}{_lit(self.before_assistant)}{{{{ .Content }}}}'
            '{{ $prev = "assistant" }}',
            "{{- end }}",
            "{{- end }}",
        ]
        return "\n".join(lines)


def _by_prev(texts: dict[str, str]) -> str:
    """Go actions writing texts[$prev]: one branch per distinct text, the last one as `else`."""
    by_text: dict[str, list[str]] = {}
    for prev, text in texts.items():
        by_text.setdefault(text, []).append(prev)
    *branches, (otherwise, _) = by_text.items()
    if not branches:
        return _lit(otherwise)
    conditions = [" ".join(json.dumps(prev) for prev in prevs) for _, prevs in branches]
    return (
        "".join(
            f"{{{{ {'if' if i == 0 else 'else if'} eq $prev {condition} }}}}{_lit(text)}"
            for i, ((text, _), condition) in enumerate(zip(branches, conditions))
        )
        + f"{{{{ else }}}}{_lit(otherwise)}{{{{ end }}}}"
    )


def _lit(text: str) -> str:
    """Literal text in a Go template: as is, unless it holds `{{`, then as a quoted string (JSON escapes are Go's)."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _probe(render: ChatRenderer) -> _Layout:
    user, system = {"role": "user", "content": U1}, {"role": "system", "content": S}
    conv = [user, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    alone = _rendered(render, [user], True, "a user turn")
    with_system = _rendered(render, [system, user], True, "a system prompt and a user turn")
    turns = _rendered(render, conv, True, "two user turns with an answer between")
    turns_system = _rendered(render, [system, *conv], True, "a system prompt and two user turns")
    answered = _rendered(render, conv[:2], False, "a user turn and its answer")

    head, tail = _around(alone, [U1])
    first, before_assistant, before_user2, generation_prompt = _around(turns, [U1, A1, U2])
    if first != head or generation_prompt != tail:
        raise TemplateRefused(
            "the template writes the first user turn or the generation prompt differently "
            "when more turns follow; " + SET_INSTEAD
        )
    answer_end = _end_of_turn(_around(answered, [U1, A1])[2], before_user2)
    before_user = {"": head, "assistant": before_user2}
    default_system = None
    if turns_system.count(S) != 1:
        raise TemplateRefused(
            f"the template writes a system prompt {turns_system.count(S)} times, not once; " + SET_INSTEAD
        )
    if turns_system.index(S) < turns_system.index(U1):  # the system prompt precedes the conversation
        before_system, before_user["system"], after = _around(with_system, [S, U1])
        if after != tail or _around(turns_system, [S, U1, A1, U2]) != [
            before_system,
            before_user["system"],
            before_assistant,
            before_user2,
            tail,
        ]:
            raise TemplateRefused(
                "with a system prompt, the template writes the turns differently than without one; " + SET_INSTEAD
            )
        if head.startswith(before_system) and head.endswith(before_user["system"]):
            default_system = head[len(before_system) : len(head) - len(before_user["system"])] or None
        return _Layout(
            True,
            before_system,
            before_user,
            before_assistant,
            generation_prompt,
            answer_end,
            default_system=default_system,
        )
    if turns_system.index(U2) < turns_system.index(S):
        raise TemplateRefused("the system prompt is written after the last user turn; " + SET_INSTEAD)
    open_first, after_system, rest = _around(with_system, [S, U1])
    parts = _around(turns_system, [U1, A1, S, U2])
    if rest != tail or parts[0] != head or parts[1] != before_assistant or parts[3] != after_system:
        raise TemplateRefused(
            "the system prompt opens the last user turn, but the turns around it change with it; " + SET_INSTEAD
        )
    return _Layout(
        False,
        "",
        before_user,
        before_assistant,
        generation_prompt,
        answer_end,
        before_last_system={"": open_first, "assistant": parts[2]},
        after_last_system=after_system,
    )


def _end_of_turn(final: str, between: str) -> str:
    """The stop: what training has the model write after its answer (`final`), cut to the part that also
    follows an earlier answer (`between`, which runs on into the next turn) when that ends with a whole marker.

    Phi-3.5 ends its last turn with `<|end|>` and an EOS, an earlier one with `<|end|>`: the stop is `<|end|>`.
    gpt-oss ends its last turn with `<|return|>`, an earlier one with `<|end|>`: the stop is `<|return|>`.
    """
    common = os.path.commonprefix([final, between])
    stop = common[: common.rfind(">") + 1].strip() or final.strip()
    # Up to its first whitespace: Apriel's `<|end|>\n` + EOS stops at `<|end|>`; the EOS is a stop of its own.
    return stop.split()[0] if stop else ""


def _rendered(render: ChatRenderer, messages: list[dict[str, str]], add_generation_prompt: bool, what: str) -> str:
    try:
        return render(messages, add_generation_prompt)
    except Exception as exc:  # a template's raise_exception, or a variable it needs that training does not set
        raise TemplateRefused(f"the chat template cannot render {what}: {exc}. {SET_INSTEAD}") from exc


def _around(text: str, markers: list[str]) -> list[str]:
    """The text before, between and after `markers`, which must each occur once, in this order."""
    parts, rest = [], text
    for marker in markers:
        if text.count(marker) != 1 or marker not in rest:
            raise TemplateRefused(
                f"the template does not write each message once and in order (probe "
                f"{marker!r} in {text!r}); " + SET_INSTEAD
            )
        before, _, rest = rest.partition(marker)
        parts.append(before)
    return [*parts, rest]


def _prove(
    render: ChatRenderer,
    served: ServedTemplate,
    system_prompt: str | None,
    examples: Sequence[Sequence[dict[str, str]]],
) -> None:
    """Ollama's rendering equals training's for every proof conversation, with and without a system prompt.

    Each conversation is served three ways: the client sends the system prompt; the Modelfile's SYSTEM
    supplies it; no system prompt at all (the chat template's default, if any, is what training saw then).
    """
    conversations = [list(c) for c in PROOF_CONVERSATIONS]
    conversations += [[dict(m) for m in example if m["role"] != "system"] for example in examples]
    own = [example[0]["content"] for example in examples if example and example[0]["role"] == "system"]
    systems = [s for s in dict.fromkeys([PROOF_SYSTEM, system_prompt, *own]) if s]
    for conversation in conversations:
        cases = [(conversation, None, conversation)]
        if served.default_system:
            cases.append((conversation, served.default_system, conversation))
        for system in systems:
            trained = [{"role": "system", "content": system}, *conversation]
            cases += [(trained, None, trained), (conversation, system, trained)]
        for sent, modelfile_system, trained in cases:
            expected = _rendered(render, trained, True, "a proof conversation")
            got = render_served_prompt(served.template, sent, modelfile_system)
            if got != expected:
                raise TemplateRefused(_first_difference(expected, got, sent, modelfile_system))


def _check_reasoning(render: ChatRenderer, reasoning: Reasoning) -> None:
    """An answer trained under `reasoning` is one the served model writes after the (proven) generation prompt
    and whose reply evaluation, parity and the smoke test read: reasoning block, then answer."""
    try:
        check_probe_answer(render, reasoning)
    except AnswerRefused as exc:
        raise TemplateRefused(f"with data.reasoning: {reasoning}, {exc}. {SET_INSTEAD}") from exc
    except Exception as exc:  # a template's raise_exception, say
        raise TemplateRefused(f"the chat template cannot render an answer: {exc}. {SET_INSTEAD}") from exc


def _first_difference(expected: str, got: str, sent: list[dict[str, str]], system: str | None) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    where = f"{len(sent)} message(s)" + (" with the Modelfile's SYSTEM" if system else "")
    return (
        f"the derived Ollama template renders {where} differently from the chat template at character "
        f"{at}: training has {expected[max(0, at - 40) : at + 40]!r}, Ollama would have "
        f"{got[max(0, at - 40) : at + 40]!r}. {SET_INSTEAD}"
    )
