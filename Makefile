# The two commands of the README: `make demo` and `make test`. Everything builds on `make install`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-smoke clean

install: $(STAMP)

# Both packages in editable mode plus the test tools, pinned by constraints.txt; nothing else.
$(STAMP): sdk/pyproject.toml service/pyproject.toml constraints.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e './sdk[torch,lightning,transformers,keras]' -e ./service -r requirements-test.txt
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
