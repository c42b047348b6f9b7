# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check clean install bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/syncd demo

# Lint and types first, so that pytest's summary is the last line CI prints. The tests
# mostly wait on servers and subprocesses: one pytest worker per core halves the wall time.
TEST_WORKERS ?= auto
test: lint typecheck
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Benchmarks print figures (see BENCHMARKS.md); not part of `make test`. About 8 minutes.
bench: $(STAMP)
	$(BIN)/python -m bench

# Every Python file in the repository; mypy reads the same list from pyproject.toml.
PY_TREE := src tests bench

lint: $(STAMP)
	$(BIN)/ruff check $(PY_TREE)
	$(BIN)/ruff format --check $(PY_TREE)

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info
