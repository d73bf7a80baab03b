# The two commands of the README: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: setup demo test quick lint services clean

$(BIN)/ingest: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/ingest ## create .venv with ingest and its dev tools

demo: setup ## embedded broker + migrate + publish a sample + drain + summary
	scripts/ensure-services
	$(BIN)/ingest dev up
	$(BIN)/ingest demo

test: setup ## lint, then unit, integration and fault-injection tests (starts Postgres/Redis when they are down)
	scripts/ensure-services
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest --faults
	scripts/lowest-deps  # unit tests on the lowest dependency versions pyproject.toml allows (.venv-lowest)

quick: setup ## unit and integration tests only (no lint, no fault-injection suite)
	scripts/ensure-services
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	-$(BIN)/ingest dev down
	rm -rf $(VENV) .venv-lowest *.egg-info .pytest_cache .mypy_cache .ruff_cache
