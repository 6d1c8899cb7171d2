# clip_pl — the two commands a new user runs:
#   make demo   build the demo corpus (local HTTP server → img2dataset → shards), train, evaluate
#   make test   the test suite (CPU; the SLURM tests need slurm-wlm + munge, see .ci/run)
#   make test-quick   the quick tier for iteration: no SLURM cluster, no `slow` tests (≤ 3 min on 2 cores)
#   make lint   ruff's formatter check and linter (configured in pyproject.toml)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick lint format bench clean

# pip byte-compiles what it installs, but an editable install leaves our own sources as they are; where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every process then compiles clip_pl from source
# again, ~0.4 s of CPU each, and `make test` starts a few hundred. compileall skips files already compiled.
setup: $(VENV)/.installed
	$(PY) -m compileall -q clip_pl data_prep benchmarks tests

# The venv is refreshed whenever pyproject.toml changes. torch/torchvision come from the
# machine's wheel cache where one exists (pip constraint), otherwise from PyPI.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m clip_pl.demo

# Three test processes (pytest-xdist) on 2 cores, one torch thread each (tests/conftest.py): much of a
# test's time is waiting on a subprocess, a SLURM job or a socket, which a third worker fills (measured:
# 18:10 with -n 2, 17:02 with -n 3 on the 2-core box). The machine is then ~98 % busy: what shortens the
# suite now is less CPU work per test, not more workers. Tests that share a fixture built once run in the
# same worker (tests/conftest.py).
XDIST := -n 3 --dist loadscope --no-loadscope-reorder

# --durations: the 20 slowest tests at the end of every run, where a slow new test shows first.
test: setup
	$(PY) -m pytest $(XDIST) --durations=20 $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest $(XDIST) -m "not slurm and not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

# Rewrites the tree as `make lint` wants it.
format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# CPU benchmarks against the reference implementations, measured in the same run (see benchmarks/RESULTS.md).
bench: setup
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.loader_bench
	$(PY) -m benchmarks.grad_cache_memory
	$(PY) -m benchmarks.eval_suite
	$(PY) -m benchmarks.curate_bench

clean:
	rm -rf $(VENV) outputs runs demo_out .pytest_cache
