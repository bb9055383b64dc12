# The README's commands. Each target creates .venv when missing and installs the project first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA, install the CPU build of torch first so no dependency can pull a
# multi-GB CUDA build. Extra pip arguments for that step (e.g. an index URL) go in TORCH_PIP_ARGS.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# The tested versions of every package (torch's CPU set), made by `make lock` from pyproject's ranges; the install
# takes them as constraints. LOCK= (empty) installs from the ranges alone, as `pip install -e .` into your own env.
LOCK ?= requirements/cpu.lock
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install assets run test test-slow bench lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e '.[dev]'
	touch $@

# Refresh the lock: the newest releases pyproject's ranges allow, for Python >= 3.10 on any platform (uv's universal
# resolution), torch pinned to TORCH_SPEC as its CPU build declares its needs (pyproject's [tool.uv]).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	echo "$(TORCH_SPEC)" | $(VENV)/bin/uv pip compile pyproject.toml - --extra dev --universal --python-version 3.10 \
		--custom-compile-command "make lock" -o requirements/cpu.lock

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
