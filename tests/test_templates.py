"""Every real chat template llama.cpp ships (models/templates), and the real models' own, served as trained.

Each is translated from what it renders (tasks/integrations/ollama/template.py) and proven against transformers'
rendering with Go's own text/template; a refused one must be refused for the reason listed. One Go process serves
all the renders (tasks/integrations/ollama/render.py).
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.integrations.llama_cpp import chat_templates_dir
from tunepipe.tasks.integrations.ollama.render import render_served_prompt
from tunepipe.tasks.integrations.ollama.template import TemplateRefused, ollama_template, transformers_renderer

EOS = "<EOS>"  # any text does: templates only place it (after an answer, Mistral and DeepSeek)

# Why a template is refused (under keep and wrap, which render alike, and under strip); unlisted: identical.
CANNOT_TOOLS = "cannot render a user turn: 'NoneType' object is not iterable"
PREFIX = "renders this conversation's prefix differently from the whole"
MARKUP = "has the model write"  # markup of its own before the answer or reasoning that is no constant prefix
REFUSED = {
    "Apriel-1.6-15b-Thinker-fixed": (PREFIX, None),
    "Cohere2MoE": (PREFIX, None),
    "CohereForAI-c4ai-command-r-plus-tool_use": (CANNOT_TOOLS, CANNOT_TOOLS),
    "Kimi-K2-Thinking": (MARKUP, None),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": (CANNOT_TOOLS, CANNOT_TOOLS),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (CANNOT_TOOLS, CANNOT_TOOLS),
    "fireworks-ai-llama-3-firefunction-v2": ("cannot render a user turn: 'functions' is undefined",) * 2,
    "google-gemma-2-2b-it": ("cannot render a system prompt and a user turn: System role not supported",) * 2,
}
TEMPLATES = sorted(chat_templates_dir().glob("*.jinja"))


def test_the_corpus_is_llama_cpps_seventy() -> None:
    assert len(TEMPLATES) == 70
    assert set(REFUSED) <= {path.stem for path in TEMPLATES}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda path: path.stem)
def test_real_template_is_served_as_trained_or_refused_with_its_reason(path) -> None:
    """Under each data.reasoning mode, rendered as the run renders (enable_thinking off for strip, a fixed date):
    the derived TEMPLATE is proven and an answer trains as the served model writes it, or it is refused with
    its reason. wrap renders exactly as keep does (same variables, same answer with reasoning): not repeated."""
    for mode, reason in zip(("keep", "strip"), REFUSED.get(path.stem, (None, None)), strict=True):
        text = path.read_text(encoding="utf-8")
        render = transformers_renderer(
            text, eos_token=EOS, chat=ChatContext.for_template(mode, text, dt.date(2026, 12, 1))
        )
        if reason is not None:
            with pytest.raises(TemplateRefused, match=re.escape(reason)):
                ollama_template(render, reasoning=mode)
            continue
        served = ollama_template(render, reasoning=mode)  # proven, or it raises with the first difference
        _assert_stops_end_the_trained_answer(render, served.stops)


def test_real_models_templates_are_served_as_trained() -> None:
    """SmolLM2-135M-Instruct's ChatML with its default system prompt; Gemma 3's turns, with no system role."""
    from tunepipe.tasks.model.gguf_metadata import read_gguf_metadata
    from tunepipe.tasks.model.packaged import PACKAGED, packaged_gguf

    smollm2 = read_gguf_metadata(packaged_gguf("smollm2-135m-instruct"))
    smol = ollama_template(transformers_renderer(smollm2["tokenizer.chat_template"], eos_token="<|im_end|>"))
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smol.stops == ["<|im_end|>"]
    gemma = ollama_template(transformers_renderer(PACKAGED["gemma3-270m"].chat_template))
    assert gemma.default_system is None and gemma.stops == ["<end_of_turn>"]
    # No system turn: the system prompt opens the first user turn, as Gemma was trained.
    assert "<start_of_turn>system" not in gemma.template


def test_a_date_printing_template_is_served_with_the_date_training_used() -> None:
    """Llama 3.2 prints today's date into its system preamble: the TEMPLATE carries training's date, not the
    day it is derived (registration may come days later)."""
    text = (chat_templates_dir() / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text(encoding="utf-8")
    trained = dt.date(2025, 3, 4)
    served = ollama_template(transformers_renderer(text, eos_token=EOS, chat=ChatContext(date=trained)))
    assert "Today Date: 04 Mar 2025" in served.template
    assert dt.date.today().strftime("%d %b %Y") not in served.template


def _assert_stops_end_the_trained_answer(render, stops: list[str]) -> None:
    """The stop is what training has the model write right after its answer; without one, the EOS ends it."""
    answer = "ANSWERPROBE"
    trained = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], False)
    after = trained[trained.index(answer) + len(answer) :].lstrip()
    if stops:
        (stop,) = stops
        assert after.startswith(stop)
    else:  # the template writes nothing after an answer: the tokenizer's EOS (added by modelfile_spec) ends it
        assert after in ("", EOS)


# --- Reasoning templates under data.reasoning ------------------------------------------------------------------

REASONING = "Check the heading."
ANSWER = '{"name": "Kettle"}'


class _Tokenizer:
    """What format_data and evaluation ask of a tokenizer: its chat template rendered as transformers renders it,
    with the variables the caller passes (the run's ChatContext), and text to ids (one id per character)."""

    def __init__(self, chat_template: str) -> None:
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool, **kwargs) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        (text,), _ = render_jinja_template(
            [messages],
            chat_template=self.chat_template,
            bos_token="",
            eos_token=EOS,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return text

    def __call__(self, text: str, add_special_tokens: bool) -> dict:
        return {"input_ids": [ord(c) for c in text]}


THINKING = [
    "Qwen-Qwen3-0.6B",
    "HuggingFaceTB-SmolLM3-3B",
    "Qwen3.5-4B",
    "StepFun3.5-Flash",
    "NVIDIA-Nemotron-Nano-v2",
    "Qwen-QwQ-32B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai-DeepSeek-V4",
    "poolside-Laguna-S-2.1",
    "deepseek-ai-DeepSeek-V3.2",
    "deepseek-ai-DeepSeek-V3.1",
]

# Those that read `enable_thinking`.
SWITCHES = {
    "Qwen-Qwen3-0.6B",
    "HuggingFaceTB-SmolLM3-3B",
    "Qwen3.5-4B",
    "Qwen-QwQ-32B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V4",
    "poolside-Laguna-S-2.1",
    "deepseek-ai-DeepSeek-V3.2",
    "deepseek-ai-DeepSeek-V3.1",
}
FIELDED = {"deepseek-ai-DeepSeek-V4", "poolside-Laguna-S-2.1", "deepseek-ai-DeepSeek-V3.2"}
# Templates whose every reply opens with markup of their own: the probes find it as the reply prefix, which
# ends the generation prompt (by data.reasoning where it differs: keep, strip).
PREFIXED = {
    "openai-gpt-oss-120b": ("<|channel|>final<|message|>",) * 2,
    "upstage-Solar-Open-100B": ("<|content|>",) * 2,
    "meetkai-functionary-medium-v3.2": ("all\n",) * 2,
    "muse-glimmer": (" to=user<|message|>",) * 2,
    "Kimi-K3": ("<|close|>think<|sep|><|open|>response<|sep|>",) * 2,
    "MiniMax-M3": ("</mm:think>",) * 2,
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("<|START_RESPONSE|>",) * 2,
}


@pytest.mark.parametrize("policy", ["keep", "strip", "wrap"])
@pytest.mark.parametrize("name", [*THINKING, *PREFIXED])
def test_reasoning_template_trains_what_evaluation_and_serving_read(name: str, policy: str) -> None:
    """Training, evaluation, parity and the smoke test see one generation prompt under data.reasoning (Qwen3's
    and SmolLM3's `enable_thinking` off for strip: an empty `<think>` block in it), the served TEMPLATE's
    (proven), and what the model is trained to write after it splits into the reasoning `data.reasoning` kept
    and the answer they judge, also where the generation prompt opens the block and the template renders a
    finished answer without its reasoning (QwQ, the DeepSeek-R1 distills) or with an emptied block (DeepSeek
    V3.1), and where the template takes the reasoning in the answer's `reasoning_content` field (DeepSeek V4,
    Laguna S). Where every reply opens with markup of the template's own (gpt-oss's final channel, Solar,
    functionary, Kimi K3, Command R7B), the generation prompt ends with it and the model is trained to write only
    what follows: all Ollama returns up to the stop."""
    from tunepipe.tasks.chat.examples import Example, Message, split_reasoning
    from tunepipe.tasks.chat.generation import render_prompt
    from tunepipe.tasks.data.format import _pieces
    from tunepipe.tasks.data.shapes import apply_reasoning

    template = (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    chat = ChatContext.for_template(policy, template, dt.date(2026, 12, 1))
    # DeepSeek V4 and Laguna S read an answer's reasoning from its `reasoning_content` field.
    assert chat.reasoning_field == (policy != "strip" and name in FIELDED)
    assert chat.reply_prefix == PREFIXED.get(name, ("", ""))[policy == "strip"]
    served = ollama_template(transformers_renderer(template, eos_token=EOS, chat=chat), reasoning=policy)
    trained = apply_reasoning(f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", "messages[1].content", policy)
    example = Example(
        id="x",
        source="train.jsonl",
        line=1,
        messages=[Message(role="user", content="<p>Kettle</p>"), Message(role="assistant", content=trained)],
    )
    (prompt, _), (completion, is_answer) = _pieces(_Tokenizer(template), example, chat)
    user = [example.messages[0].model_dump()]
    assert is_answer and prompt == render_served_prompt(served.template, user)
    assert prompt.endswith(chat.reply_prefix)
    assert render_prompt(_Tokenizer(template), user, chat) == [ord(c) for c in prompt]  # evaluation's, parity's
    # Thinking off: the template closes an empty block in the generation prompt.
    assert prompt.rstrip().endswith("</think>") == (policy == "strip" and name in SWITCHES)
    reasoning, answer = split_reasoning(completion.split(served.stops[0])[0])
    assert answer.strip() == ANSWER
    if policy == "strip":  # no reasoning, or an empty block (the template's, or closing the one the prompt opened)
        assert not reasoning
    else:
        assert reasoning == REASONING


@pytest.mark.parametrize("name", ["Qwen-QwQ-32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"])
def test_several_answers_where_the_template_drops_earlier_reasoning_are_refused(name: str) -> None:
    """QwQ and the R1 distills render an earlier answer without its `<think>` block, while the last one trains
    with it: such a conversation is no single training sequence, and formatting names the row and the answer."""
    from tunepipe.tasks.chat.examples import Example, Message
    from tunepipe.tasks.data.format import _pieces

    answer = Message(role="assistant", content=f"<think>\nR\n</think>\n\n{ANSWER}")
    example = Example(
        id="x",
        source="train.jsonl",
        line=3,
        messages=[Message(role="user", content="q"), answer, Message(role="user", content="again"), answer],
    )
    template = (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"^train\.jsonl:3: the chat template renders the answer in "
        r"messages\[1\]\.content without its reasoning once more turns follow",
    ):
        _pieces(_Tokenizer(template), example, ChatContext())


@pytest.mark.parametrize("name", ["upstage-Solar-Open-100B", "openai-gpt-oss-120b"])
def test_several_answers_behind_a_reply_prefix_train_each_or_are_refused(name: str) -> None:
    """Each answer of a conversation trains after the generation prompt that ends with the reply prefix (Solar);
    gpt-oss renders an earlier answer ending `<|end|>` where the last one trained `<|return|>`, so such a row is
    no single training sequence and formatting names it."""
    from tunepipe.tasks.chat.examples import Example, Message
    from tunepipe.tasks.data.format import FormatRefused, _pieces

    template = (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    chat = ChatContext.for_template("strip", template, dt.date(2026, 12, 1))
    example = Example(
        id="x",
        source="train.jsonl",
        line=2,
        messages=[
            Message(role="user", content="q"),
            Message(role="assistant", content="A1"),
            Message(role="user", content="again"),
            Message(role="assistant", content="A2"),
        ],
    )
    if name == "openai-gpt-oss-120b":
        with pytest.raises(FormatRefused, match=r"^train\.jsonl:2: the chat template renders this conversation's"):
            _pieces(_Tokenizer(template), example, chat)
        return
    pieces = _pieces(_Tokenizer(template), example, chat)
    assert [text for text, trained in pieces if trained] == ["A1<|end|>", "A2<|end|>"]
    assert all(text.endswith(chat.reply_prefix) for text, trained in pieces if not trained)
