"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, same arguments), for a .gguf
judge: started by `tunepipe.tasks.evaluate.judge.local_judge_server`, with its model loaded as every GGUF here is
(`extra_buffer_types_off`: llama.cpp's AMX kernels crash on small quantized models)."""

from __future__ import annotations

import runpy

from tunepipe.tasks.integrations.llama_cpp import extra_buffer_types_off

if __name__ == "__main__":
    with extra_buffer_types_off():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
