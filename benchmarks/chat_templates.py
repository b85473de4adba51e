"""Every chat template in llama.cpp's models/templates through tunepipe's translation: identical or refused.

Per template: whether the derived Ollama TEMPLATE was proven identical to transformers' rendering (Go's own
text/template, filled as Ollama's /api/chat does), the reason when refused, the stop, the default system
prompt the template adds, and whether it alters message contents beyond the proof (it strips the whitespace
around a content: Go's template language cannot, so such a model is served identically only for contents
without it). Prints a Markdown table and the wall and CPU time of the derivations.

Then, for each accepted template that mentions thinking, what training makes of an answer with a reasoning
block under each `data.reasoning` policy: `ok` when the text the model is trained to write after the
generation prompt (up to the stop) splits, by `split_reasoning`, into the answer (and, for keep/wrap, the
reasoning) that evaluation, parity and the smoke test judge; `refused` when the generation prompt is not a
prefix of the whole conversation (formatting refuses to train); otherwise the start of that text.

    .venv/bin/python benchmarks/chat_templates.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.examples import split_reasoning  # noqa: E402
from tasks.llama_cpp_tools import chat_templates_dir  # noqa: E402
from tasks.load_data import apply_reasoning  # noqa: E402
from tasks.ollama.render import render_served_prompt  # noqa: E402
from tasks.ollama.template import TemplateRefused, ollama_template, transformers_renderer  # noqa: E402

PADDED = [{"role": "user", "content": "  padded question\n"}, {"role": "assistant", "content": " padded answer\n"},
          {"role": "user", "content": "next"}]


ANSWER = '{"name": "Kettle"}'
THOUGHT = "<think>\nThe heading names it.\n</think>\n\n" + ANSWER


def reasoning_outcome(render, stops: list[str], policy: str) -> str:
    user = [{"role": "user", "content": "<p>Kettle</p>"}]
    trained = apply_reasoning(THOUGHT, None, policy, "answer")
    prompt = render(user, True)
    whole = render([*user, {"role": "assistant", "content": trained}], False)
    if not whole.startswith(prompt):
        return "refused"
    written = whole[len(prompt):].split(stops[0])[0] if stops else whole[len(prompt):].removesuffix("<EOS>")
    reasoning, answer = split_reasoning(written)
    if answer.strip() == ANSWER and (not reasoning if policy == "strip" else reasoning == "The heading names it."):
        return "ok"
    return "`" + written[:40].replace("\n", "\\n").replace("|", "\\|") + "`"


def main() -> None:
    rows, thinking, identical, started, cpu = [], [], 0, time.perf_counter(), time.process_time()
    for path in sorted(chat_templates_dir().glob("*.jinja")):
        render = transformers_renderer(path.read_text(encoding="utf-8"), eos_token="<EOS>")
        try:
            served = ollama_template(render)
        except TemplateRefused as exc:
            reason = str(exc).split(". Set `ollama.template`")[0].split("; Set")[0]
            rows.append(f"| {path.stem} | refused | {reason} | | | |")
            continue
        identical += 1
        trims = render_served_prompt(served.template, PADDED) != render(PADDED, True)
        default = (served.default_system or "")[:50].replace("\n", " ").replace("|", "\\|")
        stop = ", ".join(f"`{s}`".replace("|", "\\|") for s in served.stops) or "(EOS only)"  # GFM cells
        rows.append(f"| {path.stem} | identical | | {stop} | {default} | {'yes' if trims else ''} |")
        if "think" in path.read_text(encoding="utf-8"):
            outcomes = " | ".join(reasoning_outcome(render, served.stops, p) for p in ("keep", "strip", "wrap"))
            thinking.append(f"| {path.stem} | {outcomes} |")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print("| template | served | why refused | stop | default system prompt | strips contents |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| template that mentions thinking | keep | strip | wrap |\n|---|---|---|---|")
    print("\n".join(thinking))
    print(f"\n{identical} identical, {len(rows) - identical} refused, of {len(rows)}; "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU in this process (Go's renders run in the harness process)")


if __name__ == "__main__":
    main()
