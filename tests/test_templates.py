"""Every real chat template llama.cpp ships (models/templates), and the real models' own, served as trained.

Each is translated from what it renders (tasks/ollama/template.py) and proven against transformers' rendering
with Go's own text/template; a refused one must be refused for the reason listed. One Go process serves all
the renders (tasks/ollama/render.py).
"""

from __future__ import annotations

import pytest

from tasks.llama_cpp_tools import chat_templates_dir
from tasks.ollama.render import render_served_prompt
from tasks.ollama.template import TemplateRefused, ollama_template, transformers_renderer

EOS = "<EOS>"  # any text does: templates only place it (after an answer, Mistral and DeepSeek)

# The five that transformers itself cannot render with a system prompt and a user turn.
REFUSED = {
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": "cannot render a user turn: 'NoneType' object is not iterable",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "cannot render a user turn: 'NoneType' object is not "
                                                           "iterable",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "cannot render a user turn: 'NoneType' object is not "
                                                         "iterable",
    "fireworks-ai-llama-3-firefunction-v2.jinja": "cannot render a user turn: 'functions' is undefined",
    "google-gemma-2-2b-it.jinja": "cannot render a system prompt and a user turn: System role not supported",
}
TEMPLATES = sorted(chat_templates_dir().glob("*.jinja"))


def test_the_corpus_is_llama_cpps_seventy() -> None:
    assert len(TEMPLATES) == 70
    assert set(REFUSED) <= {path.name for path in TEMPLATES}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda path: path.stem)
def test_real_template_is_served_as_trained_or_refused_with_its_reason(path) -> None:
    render = transformers_renderer(path.read_text(encoding="utf-8"), eos_token=EOS)
    if path.name in REFUSED:
        with pytest.raises(TemplateRefused, match=REFUSED[path.name].replace("(", r"\(").replace(")", r"\)")):
            ollama_template(render)
        return
    served = ollama_template(render)  # proven, or it raises with the first difference
    _assert_stops_end_the_trained_answer(render, served.stops)


def test_real_models_templates_are_served_as_trained() -> None:
    """SmolLM2-135M-Instruct's ChatML with its default system prompt; Gemma 3's turns, with no system role."""
    from tasks.real_models import PACKAGED, packaged_gguf, read_gguf_metadata

    smollm2 = read_gguf_metadata(packaged_gguf("smollm2-135m-instruct"))
    smol = ollama_template(transformers_renderer(smollm2["tokenizer.chat_template"], eos_token="<|im_end|>"))
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smol.stops == ["<|im_end|>"]
    gemma = ollama_template(transformers_renderer(PACKAGED["gemma3-270m"].chat_template))
    assert gemma.default_system is None and gemma.stops == ["<end_of_turn>"]
    # No system turn: the system prompt opens the first user turn, as Gemma was trained.
    assert "<start_of_turn>system" not in gemma.template


def _assert_stops_end_the_trained_answer(render, stops: list[str]) -> None:
    """The stop is what training has the model write right after its answer; without one, the EOS ends it."""
    answer = "ANSWERPROBE"
    trained = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], False)
    after = trained[trained.index(answer) + len(answer):].lstrip()
    if stops:
        (stop,) = stops
        assert after.startswith(stop)
    else:  # the template writes nothing after an answer: the tokenizer's EOS (added by modelfile_spec) ends it
        assert after in ("", EOS)


# --- Reasoning templates under data.reasoning ------------------------------------------------------------------

REASONING = "Check the heading."
ANSWER = '{"name": "Kettle"}'


class _Tokenizer:
    """What format_data asks of a tokenizer to render a conversation: its chat template, as transformers renders."""

    def __init__(self, render) -> None:
        self.render = render

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        return self.render(messages, add_generation_prompt)


@pytest.mark.parametrize("policy", ["keep", "strip", "wrap"])
@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B", "Qwen3.5-4B", "StepFun3.5-Flash", "NVIDIA-Nemotron-Nano-v2"])
def test_reasoning_template_trains_what_evaluation_and_serving_read(name: str, policy: str) -> None:
    """Training, evaluation, parity and the smoke test see one generation prompt (the served TEMPLATE's, proven),
    and what the model is trained to write after it splits into the reasoning `data.reasoning` kept and the
    answer they judge, also where the generation prompt itself opens the `<think>` block (Qwen3.5)."""
    from tasks.examples import Example, Message, split_reasoning
    from tasks.format_data import _pieces
    from tasks.load_data import apply_reasoning

    render = transformers_renderer((chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8"),
                                   eos_token=EOS)
    served = ollama_template(render)
    trained = apply_reasoning(f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", None, policy, "messages[1].content")
    example = Example(id="x", source="train.jsonl", line=1, messages=[
        Message(role="user", content="<p>Kettle</p>"), Message(role="assistant", content=trained)])
    (prompt, _), (completion, is_answer) = _pieces(_Tokenizer(render), example)
    assert is_answer and prompt == render_served_prompt(served.template, [example.messages[0].model_dump()])
    reasoning, answer = split_reasoning(completion.split(served.stops[0])[0])
    assert answer.strip() == ANSWER
    if policy == "strip":  # no reasoning, or the empty block the template writes (Qwen3)
        assert not reasoning
    else:
        assert reasoning == REASONING


@pytest.mark.parametrize("name", ["Qwen-QwQ-32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"])
def test_template_that_drops_the_trained_reasoning_is_refused_by_formatting(name: str) -> None:
    """QwQ and the R1 distills open `<think>` in the generation prompt but render a past answer without its
    reasoning: the prompt is not a prefix of the whole, so formatting refuses rather than train on that."""
    from tasks.examples import Example, Message
    from tasks.format_data import _pieces

    render = transformers_renderer((chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8"),
                                   eos_token=EOS)
    example = Example(id="x", source="train.jsonl", line=3, messages=[
        Message(role="user", content="q"), Message(role="assistant", content=f"<think>\nR\n</think>\n\n{ANSWER}")])
    with pytest.raises(ValueError, match=r"train\.jsonl:3: the chat template renders this conversation's prefix "
                                         r"differently from the whole; set model\.chat_template"):
        _pieces(_Tokenizer(render), example)
