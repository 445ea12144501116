# Every target builds what it needs from nothing: a fresh clone has no venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Only directories that exist in this checkout (examples/ may be absent).
LINT_PATHS := $(wildcard src tests bench streams examples)

.PHONY: demo test lint typecheck check bench clean schemas

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	LEDGER_HOME=$${LEDGER_HOME:-.ledger-demo} ./scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest tests

schemas: $(STAMP)
	$(BIN)/ledger schemas export schemas

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .ledger .ledger-demo .pytest_cache .mypy_cache .ruff_cache
