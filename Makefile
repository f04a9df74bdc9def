# make test: set up .venv with the test dependencies (once) and run the suite.
# make lint: ruff and mypy.  make bench: the benchmarks under bench/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint bench clean

$(BIN)/cronguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: $(BIN)/cronguard
	$(BIN)/pytest

lint: $(BIN)/cronguard
	$(BIN)/ruff check cronguard tests bench
	$(BIN)/mypy

bench: $(BIN)/cronguard
	$(BIN)/python bench/overhead

clean:
	rm -rf $(VENV) build dist *.egg-info
