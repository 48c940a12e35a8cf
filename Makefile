# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/single-leader-semi-sync.yaml

.PHONY: run test install browser bench clean

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
test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

## tests/proc/test_ui.py drives a headless chromium: install Debian's when missing and we can
## (root with apt-get); otherwise that test fails saying how to install it
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "browser: /usr/bin/chromium and /usr/bin/chromedriver present"; \
	elif ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
		echo "browser: /usr/bin/chromium or /usr/bin/chromedriver missing and cannot apt-get here" \
		     "(not root or no apt-get); tests/proc/test_ui.py will fail: apt-get install chromium chromium-driver"; \
	else \
		echo "browser: apt-get install -y chromium chromium-driver (for tests/proc/test_ui.py)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			|| echo "browser: apt-get failed; tests/proc/test_ui.py will fail saying how to install chromium"; \
	fi

bench: $(STAMP)
	$(BIN)/python benchmarks/node_bench.py

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
