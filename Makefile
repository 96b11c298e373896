# The two commands of the README: `make demo` and `make test`. Everything builds on `make install`.
# For development: `make test-fast` (the unit tests, under two minutes; markers in pytest.ini) and
# `make lint` (ruff, the formatter's check, mypy and the import contracts of pyproject.toml).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench-smoke clean

install: $(STAMP)

# Both packages in editable mode plus the test tools, pinned by constraints.txt; nothing else.
$(STAMP): sdk/pyproject.toml service/pyproject.toml constraints.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e './sdk[torch,lightning,transformers,keras]' -e ./service -r requirements-test.txt
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

# The whole suite: unit tests, end-to-end runs of the real collector, benchmark smoke runs, fuzzing.
test: install
	$(BIN)/python -m pytest

# Everything but the e2e, bench and fuzz markers (pytest.ini says what each one covers).
test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not bench and not fuzz" -q

# Only the benchmark smoke runs (tests/test_bench_smoke.py, marker bench).
bench-smoke: install
	$(BIN)/python -m pytest -m bench -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
