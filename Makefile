# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/single-leader-semi-sync.yaml

.PHONY: run test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## start a local 3-node cluster (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/kvstore cluster up --config $(CONFIG)

## run the whole test suite (unit, simulation, real processes, docker when available)
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/node_bench.py

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
