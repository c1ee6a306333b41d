# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with
# Python 3.11+: they create .venv/ here and install the project with its pinned dependencies.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install airflow demo test test-slow lint bench bench-runners clean
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

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

# Real Airflow for parsing deploy/airflow/ in the tests (its own venv; see requirements/airflow.txt).
$(AIRFLOW_STAMP): requirements/airflow.txt | $(STAMP)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(BIN)/uv pip install --python $(AIRFLOW_VENV)/bin/python --quiet -r requirements/airflow.txt
	touch $(AIRFLOW_STAMP)

airflow: $(AIRFLOW_STAMP)

demo: $(STAMP)
	$(BIN)/retrieval demo --out reports/oxford-dev

test: $(STAMP) $(AIRFLOW_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo
	CBIR_AIRFLOW_PYTHON=$(AIRFLOW_VENV)/bin/python $(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/extract_throughput.py --all-runtimes

bench-runners: $(STAMP)
	$(BIN)/python benchmarks/runner_scaling.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) reports .pytest_cache .ruff_cache .import_linter_cache
