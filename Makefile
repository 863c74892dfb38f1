# `make demo` and `make test` each create .venv if missing and install the package into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlib-ext demo

# Two test processes (pytest-xdist), one test file each at a time: most end-to-end tests wait on process
# start-up, sockets and leases, so two files at once keep both cores busy.
test: $(STAMP)
	$(BIN)/ruff check qlib_ext tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check qlib_ext tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
