# The two commands: `make demo` fine-tunes a real model (SmolLM2-135M) on the CPU, end to end; `make test`
# runs the test suite. Both create or update the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch; set TORCH=torch (or a CUDA build) on a GPU machine.
TORCH ?= torch==2.13.0
# llama-cpp-python as pyproject.toml pins it: installed in a step of its own because it compiles llama.cpp.
LLAMA_CPP := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
PIP := $(BIN)/python -m pip --disable-pip-version-check
# Each step prints one line saying what it installs and why it may take a while, a heartbeat while it runs,
# and keeps pip's output in $(LOGS); a failed step prints its log's tail and how to retry.
LOGS := $(VENV)/setup-logs
STEP := bash scripts/setup-step.sh

.PHONY: demo test test-fast lint setup

setup: $(VENV)/.installed

# One stamp file per step: a set-up that failed resumes at the step that failed.
$(VENV)/.step-venv:
	@$(STEP) 1/7 $(LOGS)/1-venv.log "Creating the virtual environment $(VENV) with an up-to-date pip" \
		sh -c '$(PYTHON) -m venv $(VENV) && $(PIP) install --upgrade pip'
	@touch $@

# torch goes first so that nothing pulls a different (multi-GB CUDA) build.
$(VENV)/.step-torch: $(VENV)/.step-venv
	@$(STEP) 2/7 $(LOGS)/2-torch.log "Installing $(TORCH) first, so no dependency pulls another build (a large download)" \
		$(PIP) install "$(TORCH)"
	@touch $@

$(VENV)/.step-llama-cpp: $(VENV)/.step-torch pyproject.toml
	@$(STEP) 3/7 $(LOGS)/3-llama-cpp.log "Installing $(LLAMA_CPP): the first time pip compiles llama.cpp from source, about 6 minutes on 2 cores; it caches the wheel, so later set-ups take seconds" \
		$(PIP) install --verbose "$(LLAMA_CPP)"
	@touch $@

$(VENV)/.step-tunepipe: $(VENV)/.step-llama-cpp pyproject.toml
	@$(STEP) 4/7 $(LOGS)/4-tunepipe.log "Installing tunepipe and its pinned dependencies (transformers, peft, trl, prefect, mlflow, great_expectations, ...: about 150 packages, a few minutes the first time)" \
		$(PIP) install -e ".[dev]"
	@touch $@

$(VENV)/.step-converter: $(VENV)/.step-tunepipe
	@$(STEP) 5/7 $(LOGS)/5-converter.log "Fetching llama.cpp's GGUF converter and its real chat templates once, from the llama-cpp-python source package (77 MB), so runs need no network" \
		$(BIN)/python -m tunepipe.tasks.integrations.llama_cpp
	@touch $@

# Tests render Ollama templates with Go's own text/template, as Ollama's server does.
$(VENV)/.step-go: $(VENV)/.step-converter tasks/integrations/ollama/gotemplate/main.go
	@$(STEP) 6/7 $(LOGS)/6-go.log "Installing Go (Debian's golang-go, when no go is on PATH) and building the Ollama template harness" \
		sh -c 'bash scripts/install-go.sh && $(BIN)/python -m tunepipe.tasks.integrations.ollama.render'
	@touch $@

# Real pretrained models for the demo and the tests: GGUFs that ship inside PyPI wheels.
$(VENV)/.installed: $(VENV)/.step-go
	@$(STEP) 7/7 $(LOGS)/7-real-models.log "Fetching the real models once (SmolLM2-135M-Instruct, Gemma 3 270M: GGUFs inside PyPI wheels, 330 MB), checked against their packages' sha256, and turning SmolLM2 (the demo's) into a transformers folder (about a minute the first time)" \
		$(BIN)/python -m tunepipe.tasks.model.base
	@echo "Set-up complete. \`$(BIN)/tunepipe doctor\` shows what this machine offers a run."
	@touch $@

demo: setup
	$(BIN)/tunepipe demo

test: setup
	$(BIN)/python -m pytest

# The inner loop: every test but those marked slow (whole flows, real models, servers, workers, compiling).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.step-tunepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
