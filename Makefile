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

## tests/proc/test_ui.py drives a headless chromium and tests/proc/test_resp.py uses redis-cli and
## redis-server: install Debian's when missing and we can (root with apt-get); otherwise those tests
## fail (the browser) or skip (redis) saying how to install them
browser:
	@if [ ! -x /usr/bin/redis-cli ] || [ ! -x /usr/bin/redis-server ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "redis: apt-get install -y redis-tools redis-server (for tests/proc/test_resp.py)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools redis-server \
				|| echo "redis: apt-get failed; the redis-cli tests will skip"; \
		else echo "redis: redis-cli/redis-server missing and cannot apt-get here; the redis-cli tests will skip"; fi; \
	fi
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "browser: /usr/bin/chromium and /usr/bin/chromedriver present"; \
	elif ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
		echo "browser: /usr/bin/chromium or /usr/bin/chromedriver missing and cannot apt-get here" \
		     "(not root or no apt-get); tests/proc/test_ui.py will fail: apt-get install chromium chromium-driver"; \
	else \
		echo "browser: apt-get install -y chromium chromium-driver (for tests/proc/test_ui.py)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			|| echo "browser: apt-get failed; tests/proc/test_ui.py will fail saying how to install chromium"; \
	fi

## build the documentation site (docs/, mkdocs.yml) into site/; a broken link or anchor fails it
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/node_bench.py

## coverage-guided fuzzing (atheris) of the codec and the WAL reader, FUZZ_TIME seconds each;
## seeds in fuzz/corpus/, the grown corpus in build/fuzz/, a crash leaves crash-* here.
## (The bounded hypothesis fuzz tests run with `make test`: tests/fuzz, docs/fuzzing.md.)
FUZZ_TIME ?= 60
.PHONY: fuzz
fuzz: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/python -m pip install --quiet "atheris>=2.3" || { \
		echo "fuzz: cannot install atheris into $(VENV) (pip install atheris failed: it needs a prebuilt" \
		     "manylinux wheel for this Python, or clang with libFuzzer to build from source)"; exit 1; }
	@mkdir -p build/fuzz/codec build/fuzz/wal
	$(BIN)/python fuzz/atheris_codec.py -max_total_time=$(FUZZ_TIME) -print_final_stats=1 build/fuzz/codec fuzz/corpus/codec
	$(BIN)/python fuzz/atheris_wal.py -max_total_time=$(FUZZ_TIME) -print_final_stats=1 build/fuzz/wal fuzz/corpus/wal

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
