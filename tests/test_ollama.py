"""tasks/integrations/ollama/ (host, template, Modelfile, client) against a strict local server that implements Ollama's
documented HTTP API (tests/fake_ollama.py; Ollama itself cannot be installed here), and against a real Ollama
when one answers at $OLLAMA_HOST."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import closed_port
from fake_ollama import FakeOllama

from tunepipe.tasks.demo.tiny_model import CHATML_TEMPLATE
from tunepipe.tasks.integrations.ollama.client import OllamaClient, OllamaConnectionError, OllamaError
from tunepipe.tasks.integrations.ollama.host import ollama_host
from tunepipe.tasks.integrations.ollama.modelfile import modelfile_spec
from tunepipe.tasks.integrations.ollama.render import render_served_prompt
from tunepipe.tasks.integrations.ollama.template import (
    ServedTemplate,
    TemplateRefused,
    ollama_template,
    transformers_renderer,
)
from tunepipe.tasks.runtime.config import OllamaConfig

# Meta-Llama-3-8B-Instruct's chat template, as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without its tool branch: it adds a system prompt when a conversation has none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture
def chatml_tokenizer(tmp_path: Path) -> Path:
    """A saved Qwen-style tokenizer's metadata: ChatML template, <|endoftext|> as eos, more special tokens."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<tool_call>"],
                "tokenizer_class": "Qwen2Tokenizer",
            }
        )
    )
    return folder


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """Stands in for an export: a few MiB, so the upload takes several blocks."""
    path = tmp_path / "export" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom(3 * 1024 * 1024))
    return path


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- Host -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        (None, None, "http://127.0.0.1:11434"),
        (None, "0.0.0.0:11434", "http://127.0.0.1:11434"),
        (None, "0.0.0.0", "http://127.0.0.1:11434"),
        (None, "[::]:8000", "http://[::1]:8000"),
        (None, "gpu-box", "http://gpu-box:11434"),
        (None, "https://ollama.example.com", "https://ollama.example.com:443"),
        ("http://gpu-box:8080/", "elsewhere:1", "http://gpu-box:8080"),
        ("localhost:12345", None, "http://localhost:12345"),
    ],
)
def test_host_resolution(
    configured: str | None, env: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    assert ollama_host(configured) == expected


# --- Template -------------------------------------------------------------------------------------------------


def derived(chat_template: str, eos_token: str = "") -> ServedTemplate:
    return ollama_template(transformers_renderer(chat_template, eos_token=eos_token))


def test_chatml_template_and_stop() -> None:
    served = derived(CHATML_TEMPLATE)
    assert served.stops == ["<|im_end|>"]
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": "again"},
    ]
    assert render_served_prompt(served.template, conversation, "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{}"
        "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    )
    # A conversation ending with an answer is left open, so the model can continue it (as Ollama's own are).
    assert render_served_prompt(served.template, conversation[:2]).endswith("<|im_start|>assistant\n{}")


def test_llama3_template_and_stop() -> None:
    served = derived(LLAMA3_TEMPLATE)
    assert served.stops == ["<|eot_id|>"]  # not <|start_header_id|> and the like: those cut answers short
    assert served.default_system is None
    assert render_served_prompt(served.template, [{"role": "user", "content": "hi"}], "Be brief.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_template_refusing_a_system_prompt_is_refused_with_its_reason() -> None:
    gemma2 = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    )
    with pytest.raises(
        TemplateRefused,
        match=r"cannot render a system prompt.*System role not supported.*"
        r"`ollama\.template`",
    ):
        derived(gemma2)


def test_template_that_alters_contents_is_refused_with_the_first_difference() -> None:
    """The probes' plain words pass through HTML escaping unchanged; the proof's `<p>Kettle` does not."""
    escaping = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | e }}<|end|>{% endfor %}<|assistant|>"
    with pytest.raises(
        TemplateRefused,
        match=r"differently from the chat template at character \d+: "
        r"training has '.*&lt;p&gt;Kettle.*', Ollama would have "
        r"'.*<p>Kettle.*'.*`ollama\.template`",
    ):
        derived(escaping)


# --- Modelfile ------------------------------------------------------------------------------------------------


def test_modelfile_for_chatml_tokenizer(chatml_tokenizer: Path, gguf: Path) -> None:
    settings = OllamaConfig(model_name="demo", num_ctx=2048, temperature=0.2).modelfile_settings()
    path = modelfile_spec(gguf, chatml_tokenizer, **settings).write(gguf.parent / "Modelfile")

    template = derived(CHATML_TEMPLATE, "<|endoftext|>").template
    assert path.read_text() == (
        "FROM ./model.gguf\n"
        f'TEMPLATE """{template}"""\n'
        'PARAMETER stop "<|im_end|>"\n'  # the template's end of turn
        'PARAMETER stop "<|endoftext|>"\n'  # the tokenizer's eos; no other special token
        "PARAMETER num_ctx 2048\n"
        "PARAMETER temperature 0.2\n"
    )


def test_modelfile_reads_tokenizer_config_and_points_at_a_gguf_elsewhere(tmp_path: Path, gguf: Path) -> None:
    tokenizer = tmp_path / "llama"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": LLAMA3_TEMPLATE,
                "eos_token": {"content": "<|eot_id|>", "special": True},  # an AddedToken, as older savers wrote it
            }
        )
    )
    path = modelfile_spec(gguf, tokenizer).write(tmp_path / "elsewhere" / "Modelfile")

    text = path.read_text()
    assert text.startswith(f"FROM {gguf.resolve()}\n")
    assert re.findall(r"PARAMETER stop (.*)", text) == ['"<|eot_id|>"']  # deduplicated


def test_stops_include_generation_config_eos_ids_and_no_other_special_token(tmp_path: Path, gguf: Path) -> None:
    """A Qwen fine-tune that ended turns with <|endoftext|> (a generation_config eos id) rambled on past <|im_end|>."""
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    (folder / "tokenizer.json").write_text(
        json.dumps(
            {
                "added_tokens": [
                    {"id": 151643, "content": "<|endoftext|>", "special": True},
                    {"id": 151644, "content": "<|im_start|>", "special": True},
                    {"id": 151645, "content": "<|im_end|>", "special": True},
                ]
            }
        )
    )

    spec = modelfile_spec(gguf, folder)
    assert spec.stops == ["<|im_end|>", "<|endoftext|>"]  # end of turn first, each once, no <|im_start|>

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))  # a single id
    assert modelfile_spec(gguf, folder).stops == ["<|im_end|>", "<|endoftext|>"]


def test_system_prompt_default_from_template_and_from_config(tmp_path: Path, gguf: Path) -> None:
    tokenizer = tmp_path / "qwen"
    tokenizer.mkdir()
    (tokenizer / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    default = modelfile_spec(gguf, tokenizer)
    assert default.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    configured = modelfile_spec(gguf, tokenizer, system='Answer in "JSON".\nOnly.')
    text = configured.render(gguf.parent)
    assert 'SYSTEM """Answer in "JSON".\nOnly."""\n' in text


def test_triple_quotes_cannot_go_into_a_modelfile(chatml_tokenizer: Path, gguf: Path) -> None:
    spec = modelfile_spec(gguf, chatml_tokenizer, system='Say """hi""".')
    with pytest.raises(ValueError, match="system prompt contains"):
        spec.write(gguf.parent / "Modelfile")


def test_configured_template_keeps_stops(chatml_tokenizer: Path, gguf: Path) -> None:
    custom = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    spec = modelfile_spec(gguf, chatml_tokenizer, template=custom)
    assert spec.template == custom
    assert spec.stops == ["<|im_end|>", "<|endoftext|>"]


# --- The client against the stand-in --------------------------------------------------------------------------


def test_blob_is_uploaded_once_with_its_digest(fake_ollama: FakeOllama, gguf: Path) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    digest = _sha256(gguf.read_bytes())

    assert client.push_blob(gguf) == digest
    assert client.push_blob(gguf, digest) == digest  # known digest: asked, not hashed or sent again

    assert fake_ollama.blobs == {digest: gguf.read_bytes()}
    assert fake_ollama.calls == [f"HEAD /api/blobs/{digest}", f"POST /api/blobs/{digest}", f"HEAD /api/blobs/{digest}"]


def test_create_show_copy_tags_delete_send_the_documented_requests(fake_ollama: FakeOllama, gguf: Path) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    digest = client.push_blob(gguf)
    template = derived(CHATML_TEMPLATE).template
    parameters = {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048, "temperature": 0.0}

    client.create("demo:3", files={"model.gguf": digest}, template=template, system="Be brief.", parameters=parameters)
    shown = client.show("demo:3")
    client.copy("demo:3", "demo:latest")
    names = client.tags()
    client.delete("demo:3")

    assert fake_ollama.requests[2:] == [
        (
            "POST",
            "/api/create",
            {
                "model": "demo:3",
                "stream": True,
                "files": {"model.gguf": digest},
                "template": template,
                "system": "Be brief.",
                "parameters": parameters,
            },
        ),
        ("POST", "/api/show", {"model": "demo:3"}),
        ("POST", "/api/copy", {"source": "demo:3", "destination": "demo:latest"}),
        ("GET", "/api/tags", None),
        ("DELETE", "/api/delete", {"model": "demo:3"}),
    ]
    assert shown.template == template
    assert names == ["demo:3", "demo:latest"]
    assert client.tags() == ["demo:latest"]


def test_adapter_route_creates_from_a_base_with_adapters(fake_ollama: FakeOllama, gguf: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF" + os.urandom(1024))
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    files, adapters = {"model.gguf": client.push_blob(gguf)}, {"adapter.gguf": client.push_blob(adapter)}

    client.create("demo-lora", files=files, adapters=adapters, template="{{ .Prompt }}", system=None, parameters={})

    assert fake_ollama.bodies("/api/create") == [
        {
            "model": "demo-lora",
            "stream": True,
            "files": files,
            "adapters": adapters,
            "template": "{{ .Prompt }}",
            "parameters": {},
        }
    ]


def test_reachable_only_when_something_answers(fake_ollama: FakeOllama) -> None:
    closed = OllamaClient(f"http://127.0.0.1:{closed_port()}", timeout_s=5)
    assert not closed.reachable()
    with pytest.raises(OllamaConnectionError):
        closed.version()
    with pytest.raises(OllamaConnectionError):
        closed.show("demo")  # through the official client: its ConnectionError becomes ours
    assert OllamaClient(fake_ollama.url, timeout_s=5).reachable()
    # A server that answers with an error is a real problem, not an absent Ollama.
    with pytest.raises(OllamaError, match="HTTP 404"):
        OllamaClient(fake_ollama.url + "/not-ollama", timeout_s=5).reachable()


def test_error_line_from_create_raises(fake_ollama: FakeOllama, tmp_path: Path) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    never_uploaded = "sha256:" + "0" * 64
    with pytest.raises(OllamaError, match="creating 'demo'.*no such file or directory"):
        client.create(
            "demo", files={"model.gguf": never_uploaded}, template="{{ .Prompt }}", system=None, parameters={}
        )
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("not a model")
    with pytest.raises(OllamaError, match="invalid file magic"):
        client.create(
            "demo",
            files={"notes.txt": client.push_blob(not_gguf)},
            template="{{ .Prompt }}",
            system=None,
            parameters={},
        )
    assert fake_ollama.models == {}


def test_digest_mismatch_is_refused(fake_ollama: FakeOllama, gguf: Path) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    with pytest.raises(OllamaError, match=r"POST /api/blobs/sha256:\w+ at .*: HTTP 400: digest mismatch"):
        client.push_blob(gguf, digest=_sha256(b"some other file"))
    assert fake_ollama.blobs == {}


def test_http_error_carries_the_server_message(fake_ollama: FakeOllama) -> None:
    client = OllamaClient(fake_ollama.url, timeout_s=5)
    with pytest.raises(OllamaError, match=rf"showing 'nope' at {fake_ollama.url}: HTTP 404: model 'nope' not found"):
        client.show("nope")
    with pytest.raises(OllamaError, match="HTTP 404"):
        client.copy("nope", "nope:latest")
    with pytest.raises(OllamaError, match="HTTP 404"):
        client.delete("nope")


# --- A real Ollama, when one answers -------------------------------------------------------------------------

LIVE = OllamaClient(ollama_host(None), timeout_s=600)


def _real_ollama_answers() -> bool:
    try:
        return LIVE.reachable()
    except OllamaError:  # something else listens there
        return False


needs_ollama = pytest.mark.skipif(not _real_ollama_answers(), reason=f"no Ollama answers at {LIVE.host} ($OLLAMA_HOST)")


@needs_ollama
def test_live_version() -> None:
    assert re.match(r"\d+\.\d+", LIVE.version())


@needs_ollama
@pytest.mark.skipif(not os.environ.get("TUNEPIPE_TEST_GGUF"), reason="set TUNEPIPE_TEST_GGUF to a ChatML GGUF")
def test_live_create_chat_copy_delete(chatml_tokenizer: Path) -> None:
    gguf = Path(os.environ["TUNEPIPE_TEST_GGUF"])
    spec = modelfile_spec(gguf, chatml_tokenizer, trained_system="Be brief.")
    LIVE.create(
        "tunepipe-live-test:1",
        files={gguf.name: LIVE.push_blob(gguf)},
        template=spec.template,
        system=spec.system,
        parameters=spec.api_parameters(),
    )
    try:
        assert LIVE.show("tunepipe-live-test:1").template == spec.template
        reply = LIVE.chat("tunepipe-live-test:1", [{"role": "user", "content": "Say hi."}], {"num_predict": 8})
        assert reply.done and reply.done_reason in {"stop", "length"}
        LIVE.copy("tunepipe-live-test:1", "tunepipe-live-test:latest")
        assert "tunepipe-live-test:latest" in LIVE.tags()
    finally:
        for name in ("tunepipe-live-test:1", "tunepipe-live-test:latest"):
            if name in LIVE.tags():
                LIVE.delete(name)


# --- No train/serve skew ------------------------------------------------------------------------------------


def test_served_prompt_has_the_training_token_ids(tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    """One held-out conversation, as training tokenized it and as Ollama renders it from the Modelfile.

    The client sends only the user turn (as the smoke test and any app do); Ollama adds the Modelfile's SYSTEM
    and renders TEMPLATE with Go's text/template. The ids must equal the training prompt's, up to the answer.
    """
    import yaml
    from transformers import AutoTokenizer

    from tunepipe.tasks.data.containers import DataSource
    from tunepipe.tasks.data.files import read_file
    from tunepipe.tasks.data.format import IGNORE, tokenize_conversation
    from tunepipe.tasks.data.shapes import Normaliser

    system_prompt = yaml.safe_load(Path("configs/demo.yaml").read_text())["data"]["system_prompt"]
    example = read_file(DataSource(path=demo_data[1]), Normaliser(None, system_prompt)).examples[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    input_ids, labels = tokenize_conversation(tokenizer, example)
    trained_prompt = input_ids[: next(i for i, label in enumerate(labels) if label != IGNORE)]

    spec = modelfile_spec(tiny_model / "model.gguf", tiny_model, trained_system=system_prompt)
    user_turn = [m.model_dump() for m in example.prompt if m.role != "system"]
    served = render_served_prompt(spec.template, user_turn, spec.system)
    assert spec.system == system_prompt
    assert tokenizer(served, add_special_tokens=False)["input_ids"] == trained_prompt

    # Without SYSTEM (the Modelfile before this fix) the served model saw another prompt.
    unprompted = render_served_prompt(spec.template, user_turn)
    assert tokenizer(unprompted, add_special_tokens=False)["input_ids"] != trained_prompt


def test_configured_system_prompt_wins_over_the_trained_one(chatml_tokenizer: Path, gguf: Path) -> None:
    spec = modelfile_spec(gguf, chatml_tokenizer, system="Be terse.", trained_system="Trained.")
    assert spec.system == "Be terse."
    assert modelfile_spec(gguf, chatml_tokenizer, trained_system="Trained.").system == "Trained."


def test_adapter_modelfile_is_from_base_with_adapter(chatml_tokenizer: Path, gguf: Path) -> None:
    spec = modelfile_spec(gguf, chatml_tokenizer, trained_system="Trained.")
    adapter = gguf.parent / "adapter.gguf"
    text = spec.model_copy(update={"adapter": adapter, "base": "qwen2.5:0.5b-instruct"}).render(gguf.parent)
    assert text.startswith('FROM qwen2.5:0.5b-instruct\nADAPTER ./adapter.gguf\nTEMPLATE """')
    assert 'SYSTEM """Trained."""\n' in text


# Gemma 3's template, reduced to text turns: no system role, the system prompt opens the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.mark.parametrize("chat_template", [CHATML_TEMPLATE, LLAMA3_TEMPLATE, GEMMA3_TEMPLATE])
@pytest.mark.parametrize("system", ["Answer in JSON.", None])
def test_go_template_renders_what_the_chat_template_renders(chat_template: str, system: str | None) -> None:
    """Ollama's rendering of the derived TEMPLATE (+ SYSTEM) is the text training rendered, turn for turn."""

    conversation = [
        {"role": "user", "content": "<p>Kettle</p>"},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "<p>Lamp</p>"},
    ]
    render = transformers_renderer(chat_template)
    trained = ([{"role": "system", "content": system}] if system else []) + conversation
    assert render_served_prompt(ollama_template(render).template, conversation, system) == render(trained, True)
