"""Every chat template in llama.cpp's models/templates through tunepipe's translation: identical or refused.

Per template: whether the derived Ollama TEMPLATE was proven identical to transformers' rendering (Go's own
text/template, filled as Ollama's /api/chat does), the reason when refused, the stop, the default system
prompt the template adds, and whether it alters message contents beyond the proof (it strips the whitespace
around a content: Go's template language cannot, so such a model is served identically only for contents
without it). Prints a Markdown table and the wall and CPU time of the derivations.

Then each template under each `data.reasoning` mode, rendered as the run renders it
(`tunepipe.tasks.chat.template.ChatContext`: `enable_thinking` off for strip, on for keep and wrap; a fixed
date for `strftime_now`): identical (the TEMPLATE proven, and an answer with reasoning trained as the served
model writes it and evaluation reads it) or refused and why.

    .venv/bin/python benchmarks/chat_templates.py
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.integrations.llama_cpp import chat_templates_dir
from tunepipe.tasks.integrations.ollama.render import render_served_prompt
from tunepipe.tasks.integrations.ollama.template import TemplateRefused, ollama_template, transformers_renderer

PADDED = [
    {"role": "user", "content": "  padded question\n"},
    {"role": "assistant", "content": " padded answer\n"},
    {"role": "user", "content": "next"},
]
MODES = ("keep", "strip", "wrap")
DATE = dt.date(2026, 12, 1)  # what `strftime_now` prints: the derivation is reproducible


def reason(exc: TemplateRefused) -> str:
    return str(exc).split(". Set `ollama.template`")[0].split("; Set")[0].replace("|", "\\|").replace("\n", "\\n")


def main() -> None:
    rows, by_mode, identical, started, cpu = [], [], 0, time.perf_counter(), time.process_time()
    counts = dict.fromkeys(MODES, 0)
    for path in sorted(chat_templates_dir().glob("*.jinja")):
        text = path.read_text(encoding="utf-8")
        outcomes = []
        for mode in MODES:
            render = transformers_renderer(text, eos_token="<EOS>", chat=ChatContext.for_template(mode, text, DATE))
            try:
                served = ollama_template(render, reasoning=mode)
            except TemplateRefused as exc:
                outcomes.append(f"refused: {reason(exc).removeprefix(f'with data.reasoning: {mode}, ')}")
                continue
            counts[mode] += 1
            outcomes.append("identical")
            if mode == "keep":
                identical += 1
                trims = render_served_prompt(served.template, PADDED) != render(PADDED, True)
                default = (served.default_system or "")[:50].replace("\n", " ").replace("|", "\\|")
                stop = ", ".join(f"`{s}`".replace("|", "\\|") for s in served.stops) or "(EOS only)"  # GFM cells
                rows.append(f"| {path.stem} | {stop} | {default} | {'yes' if trims else ''} |")
        by_mode.append(f"| {path.stem} | " + " | ".join(outcomes) + " |")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print("| template | keep | strip | wrap |\n|---|---|---|---|")
    print("\n".join(by_mode))
    print("\n| template identical under keep | stop | default system prompt | strips contents |\n|---|---|---|---|")
    print("\n".join(rows))
    print(
        "\n" + ", ".join(f"{mode}: {counts[mode]} identical" for mode in MODES) + f", of {len(by_mode)}; "
        f"{wall:.1f} s wall, {cpu:.1f} s CPU in this process (Go's renders run in the harness process)"
    )


if __name__ == "__main__":
    main()
