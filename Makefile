# async_wf developer commands. Every target sets up .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard src_cython/*.pyx src_cython/*.pxi src_cython/async_wf/*.pxd)

.PHONY: install demo test test-fast test-slow lint bench bench-core debug clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,mpi]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

lint: install
	$(PY) -m ruff check async_wf tests bench examples
	$(PY) -m mypy

# lint + types, the suite on the compiled core, then the runtime suite again
# on the pure-Python twin (the core tests run both twins in the first pass)
test: lint
	$(PY) -m pytest -q -m "not slow"
	ASYNC_WF_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "not slow" --ignore=tests/unit/test_core.py

test-fast: install
	$(PY) -m pytest -q -x -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# the figures in the README; Dask is measured only when installed (pip install -e ".[peers]")
bench: install
	$(PY) bench/core.py
	for w in noop chain fanin; do $(PY) bench/throughput.py --transport local --workload $$w --n 100000; done
	$(PY) bench/throughput.py --transport tcp --workers 2 --workload noop --n 20000 --peer-timeout 600
	$(PY) bench/throughput.py --transport tcp --workers 2 --workload chain --n 2000 --peer-timeout 600
	$(PY) bench/throughput.py --transport tcp --workers 2 --workload fanin --n 10000 --peer-timeout 600
	$(PY) bench/throughput.py --transport tcp --workers 2 --workload payload --n 200 --peer-timeout 600
	$(PY) bench/checkpoint.py --repeat 5

# a build with line tracing and bounds checks, for debugging the core
debug: install
	ASYNC_WF_DEBUG_BUILD=1 $(PY) setup.py build_ext --inplace --force
	$(PY) -m pytest -q tests/unit/test_core.py
	$(PY) setup.py build_ext --inplace --force

clean:
	rm -rf build dist *.egg-info async_wf/*.so src_cython/*.c .pytest_cache .mypy_cache .ruff_cache
