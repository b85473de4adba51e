# The two commands: `make demo` runs the whole pipeline on the CPU with a tiny local model; `make test`
# runs the test suite. Both create or update the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch; set TORCH=torch (or a CUDA build) on a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: demo test setup

setup: $(VENV)/.installed

# torch goes first so that nothing pulls the multi-GB CUDA build; llama-cpp-python builds llama.cpp
# from source on the first install (about 6 minutes on 2 cores; pip caches the wheel afterwards).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m tasks.llama_cpp_tools  # llama.cpp's GGUF converter, once, so runs need no network
	touch $@

demo: setup
	$(BIN)/tunepipe demo

test: setup
	$(BIN)/python -m pytest
