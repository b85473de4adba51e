"""Every real chat template llama.cpp ships (models/templates), and the real models' own, served as trained.

Each is translated from what it renders (tasks/ollama/template.py) and proven against transformers' rendering
with Go's own text/template; a refused one must be refused for the reason listed. One Go process serves all
the renders (tasks/ollama/render.py).
"""

from __future__ import annotations

import pytest

from tasks.llama_cpp_tools import chat_templates_dir
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
    real_models = pytest.importorskip("tasks.real_models", reason="the real models arrive with issue 18")
    smollm2 = real_models.read_gguf_metadata(real_models.packaged_gguf("smollm2-135m-instruct"))
    smol = ollama_template(transformers_renderer(smollm2["tokenizer.chat_template"], eos_token="<|im_end|>"))
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smol.stops == ["<|im_end|>"]
    gemma = ollama_template(transformers_renderer(real_models.PACKAGED["gemma3-270m"].chat_template))
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
