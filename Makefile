# Two entry points for a newcomer: `make demo` (the whole path on the embedded default) and
# `make test` (the whole suite). Both create .venv on first use from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: compile
	$(PY) -m pipelines.demo

test: compile
	$(PY) -m pytest

# pip compiles the packages it installs, but not an editable one: lepton_ray (and the pipelines
# and benchmarks that jobs and the tests' subprocesses run) would be compiled from source by every
# process that imports them, each Ray worker included, where PYTHONDONTWRITEBYTECODE is set (this
# project's CPU and GPU machines set it). compileall rewrites only what changed. Measured on 2 cores, per process:
# lepton_ray's trainer, feed and Serve modules (torch and Ray already imported) took 2.1 CPU-s to
# import uncompiled and 1.8 s compiled.
compile: $(VENV)/.installed
	$(PY) -m compileall -q lepton_ray pipelines benchmarks

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
	find lepton_ray pipelines benchmarks -name __pycache__ -prune -exec rm -rf {} +
