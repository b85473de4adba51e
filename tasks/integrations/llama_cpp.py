"""llama.cpp's converter, gguf-py, reference vocabularies and real chat templates, taken from the
llama-cpp-python sdist; and loading a GGUF with llama-cpp-python the way every stage and test here does
(`load_gguf`).

The converter must match the llama.cpp library that loads and quantizes the GGUF, so we fetch the source
package of exactly the installed llama-cpp-python from the package index once, keep only the Python parts,
the vocab files and the chat templates, and cache them. Nothing is compiled at run time and no llama.cpp
code is committed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# models/templates/ holds the real Hugging Face chat templates llama.cpp tests against (tests/test_templates.py).
KEEP = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "models/ggml-vocab-",
    "models/templates/",
)


def cache_root() -> Path:
    return Path(os.environ.get("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe")).expanduser()


def converter_dir() -> Path:
    """Where the converter of the installed llama-cpp-python is cached (complete when it holds `.complete`)."""
    return cache_root() / f"llama.cpp-{importlib.metadata.version('llama-cpp-python')}"


def llama_cpp_source() -> Path:
    """Folder holding llama.cpp's Python converter for the installed llama-cpp-python (fetched once)."""
    version = importlib.metadata.version("llama-cpp-python")
    dest = converter_dir()
    marker = dest / ".complete"
    # The marker names what was kept, so a cache made before KEEP grew is filled in again.
    complete = f"{version}\n" + "\n".join(KEEP) + "\n"
    if marker.exists() and marker.read_text() == complete:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary=:all:",
            f"llama-cpp-python=={version}",
            "--dest",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"could not fetch the llama-cpp-python {version} source package (needed once, for the GGUF "
                f"converter):\n{done.stderr.strip()}"
            )
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        _extract_converter(sdist, dest)
    marker.write_text(complete)
    return dest


def chat_templates_dir() -> Path:
    """llama.cpp's models/templates: real Hugging Face chat templates (`*.jinja`), one per model family."""
    return llama_cpp_source() / "models" / "templates"


def _extract_converter(sdist: Path, dest: Path) -> None:
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            relative = member.name.removeprefix(prefix)
            if member.isfile() and member.name.startswith(prefix) and relative.startswith(KEEP):
                member.name = relative
                tar.extract(member, dest, filter="data")


def run_converter(script: str, args: list[str]) -> None:
    """Run one of llama.cpp's converter scripts with the gguf-py that ships beside it."""
    source = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py"), "NO_LOCAL_GGUF": ""}
    done = subprocess.run([sys.executable, str(source / script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-4000:]}")


_LOAD_LOCK = threading.Lock()


def load_gguf(path: Path, **kwargs: Any):
    """`llama_cpp.Llama` for `path`, with llama.cpp's extra CPU buffer types (AMX, repacked weights) off
    (`extra_buffer_types_off`)."""
    from llama_cpp import Llama

    with extra_buffer_types_off():
        return Llama(model_path=str(path), verbose=False, **kwargs)


@contextlib.contextmanager
def extra_buffer_types_off() -> Iterator[None]:
    """Models loaded inside load without llama.cpp's extra CPU buffer types (AMX, repacked weights).

    On a CPU with Intel AMX, ggml's AMX matmul segfaults on the q8_0 tensors of a small model such as the
    demo's (seen with llama-cpp-python 0.3.36 on a Sapphire Rapids-class machine: llama_decode crashes inside
    ggml_backend_amx_mul_mat). `Llama` does not expose `use_extra_bufts`, so its default parameters are
    swapped for the duration of the load; the plain CPU kernels give the same tokens.
    """
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        low.llama_model_default_params = without_extra_buffer_types
        try:
            yield
        finally:
            low.llama_model_default_params = defaults


if __name__ == "__main__":
    print(f"llama.cpp converter: {llama_cpp_source()}")
