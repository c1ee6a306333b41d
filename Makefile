# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with
# Python 3.11+: they create .venv/ here and install the project with its pinned dependencies.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install demo test test-slow lint bench bench-runners clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# uv resolves and installs in about a minute; bytecode is compiled up front so TensorFlow
# imports in 3-4 s instead of 10 s on every worker start.
$(STAMP): $(BIN)/python pyproject.toml requirements/constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode \
		-c requirements/constraints.txt -e '.[test,onnx]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retrieval demo --out reports/oxford-dev

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/extract_throughput.py

bench-runners: $(STAMP)
	$(BIN)/python benchmarks/runner_scaling.py

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache
