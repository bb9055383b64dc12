# The README's commands. Each target creates .venv when missing and installs the project first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA, install the CPU build of torch first so no dependency can pull a
# multi-GB CUDA build. Extra pip arguments for that step (e.g. an index URL) go in TORCH_PIP_ARGS.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install assets run test test-slow bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

assets: install
	$(VENV)/bin/rigsa-assets

run: assets
	$(VENV)/bin/rigsa-run $(ARGS)

test: assets
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: assets
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: install
	$(PY) scripts/bench_sparse.py $(ARGS)
