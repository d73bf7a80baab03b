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
	@if [ -n "$$CI" ]; then scripts/install-test-tools $(BIN); fi
	$(BIN)/ruff check .
	$(BIN)/mypy
	scripts/lowest-deps  # unit tests on the lowest dependency versions pyproject.toml allows (.venv-lowest)
	$(BIN)/pytest --faults

quick: setup ## unit and integration tests only (no lint, no fault-injection suite)
	$(BIN)/ingest dev up postgres redis
	$(BIN)/pytest

tools: setup ## promtool and prometheus into .venv/bin and the CRD validators into tests/deploy/crd (deploy-file and scrape tests)
	scripts/install-test-tools $(BIN)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	-$(BIN)/ingest dev down
	rm -rf $(VENV) .venv-lowest *.egg-info .pytest_cache .mypy_cache .ruff_cache
