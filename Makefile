# The two commands of the README: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: setup demo test quick lint tools clean

$(BIN)/ingest: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/ingest ## create .venv with ingest and its dev tools

demo: setup ## start what does not answer on this machine (ingest dev up) + migrate + publish a sample + drain + summary
	$(BIN)/ingest dev up
	$(BIN)/ingest demo

test: setup ## lint, then unit, integration and fault-injection tests (starts Postgres/Redis when they do not answer)
	$(BIN)/ingest dev up postgres redis
	@if [ -n "$$CI" ]; then scripts/install-promtool $(BIN); fi
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest --faults

quick: setup ## unit and integration tests only (no lint, no fault-injection suite)
	$(BIN)/ingest dev up postgres redis
	$(BIN)/pytest

tools: setup ## promtool into .venv/bin, for the alert-rule tests (Debian/Ubuntu; otherwise they skip)
	scripts/install-promtool $(BIN)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	-$(BIN)/ingest dev down
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
