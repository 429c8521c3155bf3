# loop-sync: `make demo` runs the main job on the local sandbox, `make test` runs every check.
# Both create or refresh .venv first and are fast the second time.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo lint lock clean services bench

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "loop-sync needs Python 3.11 or newer: set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

# Start what the test suites need when it is installed but not running (CI starts clean).
services:
	@scripts/ensure-postgres
	@scripts/ensure-chromium

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint services
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/loop-sync demo --dir demo

# The performance benchmark of issue 6 (needs PostgreSQL): a table and PASS/FAIL per target.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.sync

# Re-pin every dependency after changing pyproject.toml (needs network to PyPI).
lock:
	$(PYTHON) -m venv /tmp/loop-sync-lock && /tmp/loop-sync-lock/bin/pip install -qq uv
	/tmp/loop-sync-lock/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--no-header -q -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
