# async_wf developer commands. Every target sets up .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard src_cython/*.pyx src_cython/*.pxi src_cython/async_wf/*.pxd)

.PHONY: install demo test test-fast test-slow test-faults test-hosts test-slurm test-browser lint bench bench-core debug clean

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
# on the pure-Python twin (the core tests run both twins in the first pass).
# The second pass leaves out what the twin cannot change: tests marked
# core_independent (builds, CLI parsing, file-format tools, kernels, MPI
# launching, codecs, report rendering, docs), which the first pass runs.
# Anything that drives the scheduler runs in both (docs/architecture.md).
# The second pass runs async tests on uvloop only (ASYNC_WF_TEST_LOOPS,
# tests/conftest.py): the core twin never touches the event loop, and the
# first pass runs every async test on both loops.
test: lint
	$(PY) -m pytest -q -m "not slow and not faults and not hosts and not slurm"
	ASYNC_WF_NO_EXTENSIONS=1 ASYNC_WF_TEST_LOOPS=uvloop $(PY) -m pytest -q -m "not slow and not faults and not hosts and not slurm and not core_independent" --ignore=tests/unit/test_core.py

test-fast: install
	$(PY) -m pytest -q -x -m "not slow and not faults and not hosts and not slurm"

test-slow: install
	$(PY) -m pytest -q -m "slow and not faults and not slurm"

# the fault-injection campaign (issue 22): worker kills and stops under load,
# a crash-looping task, an oversized result, a pre-auth flood, and a 15 s
# network cut to a worker in a network namespace (root and iproute2: installed
# with apt-get when run as root); figures in faults-report.jsonl
test-faults: install
	@if ! command -v ip >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q iproute2; \
	fi
	rm -f faults-report.jsonl
	$(PY) -m pytest -q -rs -m faults tests/faults
	@cat faults-report.jsonl

# workers on other hosts (issue 19): two network namespaces on a bridge, each
# its own host address, as root (iproute2 installed with apt-get when needed);
# held results moving between them, and a lost host's results made again
test-hosts: install
	@if ! command -v ip >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q iproute2; \
	fi
	$(PY) -m pytest -q -rs -m hosts tests/hosts

# async_wf on a real Slurm (issue 20): installs Debian's slurmctld, slurmd and
# munge when run as root with apt, starts a private one-node cluster in
# .slurm-test/ (tests/slurm/cluster.sh: non-default ports, two partitions),
# runs tests/slurm, then stops every daemon it started and checks that no
# job is left in squeue, also when a test fails
SLURM_CONF_TEST := $(CURDIR)/.slurm-test/slurm.conf
test-slurm: install
	@export SLURM_CONF=$(SLURM_CONF_TEST); rc=0; \
	tests/slurm/cluster.sh start || rc=$$?; \
	if [ $$rc = 0 ]; then $(PY) -m pytest -q -rs -p no:cacheprovider -m slurm tests/slurm || rc=$$?; fi; \
	tests/slurm/cluster.sh stop || rc=$$?; \
	exit $$rc

# the HTML report rendered by a real headless Chromium (make test skips that
# test when no browser is on PATH): installs Debian's chromium when run as
# root on a system with apt, then runs the test
CHROMIUM := $(firstword $(shell command -v chromium chromium-browser google-chrome 2>/dev/null))
test-browser: install
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium; \
	else \
		echo "test-browser: install chromium (or chromium-browser, google-chrome) first"; exit 1; \
	fi
endif
	$(PY) -m pytest -q -rs tests/unit/test_observe.py -k chromium

# the figures in the README: the suite against the peers (installed here as
# the [peers] extra), its scaling sweep, the core alone, the checkpoint log,
# in-situ analytics.
# QUICK=1: the suite only, small n, one repeat (about a minute).
PEERS_STAMP := $(VENV)/.peers-stamp
$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,mpi,peers]"
	@touch $(PEERS_STAMP)

bench: $(PEERS_STAMP)
ifdef QUICK
	$(PY) -m bench --quick --json bench/out/quick.json --png bench/out/quick.png
else
	$(PY) -m bench --repeat 3 --json bench/out/suite.json --png docs/img/bench.png
	$(PY) -m bench --scaling --repeat 1 --timeout 180 --json bench/out/scaling.json --png docs/img/scaling.png
	$(PY) bench/core.py
	$(PY) bench/checkpoint.py --repeat 5
	$(PY) bench/insitu.py --sizes 256,1024,2048 --ranks 4 --steps 200 --repeat 3 --json bench/out/insitu.json
endif

# a build with line tracing and bounds checks, for debugging the core
debug: install
	ASYNC_WF_DEBUG_BUILD=1 $(PY) setup.py build_ext --inplace --force
	$(PY) -m pytest -q tests/unit/test_core.py
	$(PY) setup.py build_ext --inplace --force

clean:
	rm -rf build dist *.egg-info async_wf/*.so src_cython/*.c .pytest_cache .mypy_cache .ruff_cache
