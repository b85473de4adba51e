"""The Go harness does what Ollama's server does before executing a TEMPLATE for /api/chat."""

from __future__ import annotations

import pytest

from tunepipe.tasks.integrations.ollama import render
from tunepipe.tasks.integrations.ollama.render import render_served_prompt

LIST = "{{ if .System }}[S]{{ .System }}{{ end }}{{ range .Messages }}[{{ .Role }}]{{ .Content }}{{ end }}"
USER = [{"role": "user", "content": "hi"}]


def test_modelfile_system_is_prepended_only_when_the_request_has_none() -> None:
    assert render_served_prompt(LIST, USER, system="sys") == "[S]sys[system]sys[user]hi"
    own = [{"role": "system", "content": "mine"}, *USER]
    assert render_served_prompt(LIST, own, system="sys") == "[S]mine[system]mine[user]hi"
    assert render_served_prompt(LIST, USER) == "[user]hi"


def test_system_messages_are_collected_and_same_role_turns_joined_with_a_blank_line() -> None:
    messages = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "q1"},
        {"role": "user", "content": "q2"},
        {"role": "system", "content": "b"},
        {"role": "assistant", "content": "r"},
    ]
    assert render_served_prompt(LIST, messages) == "[S]a\n\nb[system]a[user]q1\n\nq2[system]b[assistant]r"


def test_legacy_template_runs_per_exchange_and_stops_before_the_last_response() -> None:
    legacy = "{{ if .System }}<s>{{ .System }}</s>{{ end }}<u>{{ .Prompt }}</u><a>{{ .Response }}</a>"
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    assert render_served_prompt(legacy, messages, system="S") == "<s>S</s><u>q1</u><a>r1</a><u>q2</u><a>"
    # A template naming neither .Messages nor .Response gets `{{ .Response }}` appended, as Ollama does.
    assert render_served_prompt("{{ .Prompt }}", USER) == "hi"


def test_ollama_functions_and_go_semantics() -> None:
    template = "{{ range $i, $m := .Messages }}{{ json $m.Content }}{{ len (slice $.Messages $i) }}{{ end }}"
    assert render_served_prompt(template, [*USER, {"role": "assistant", "content": '<"x">'}]) == (
        '"hi"2"\\u003c\\"x\\"\\u003e"1'  # Go's json.Marshal escapes HTML characters, as Ollama's `json` does
    )
    assert render_served_prompt("{{- if .Think }}T{{ end }}{{ .IsThinkSet }}", USER, think=True) == "Ttrue"


def test_template_errors_name_go() -> None:
    with pytest.raises(ValueError, match="Go's text/template: .*unexpected"):
        render_served_prompt("{{ .System }", USER)
    with pytest.raises(ValueError, match="can't evaluate field Nope"):
        render_served_prompt("{{ range .Messages }}{{ .Nope }}{{ end }}", USER)


def test_missing_go_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install golang-go"):
        render.harness()
