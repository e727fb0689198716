# sdr-edge: `make demo` runs the whole pipeline on builtin:digits; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint env clean device-check

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[all,dev]"  # all extras; a device needs only pip install .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sdr_edge_server.demo --out runs/demo

# Two pytest-xdist workers (TEST_WORKERS=0: one process): a plain run keeps less than one core
# busy (843 s CPU in a 1235 s run; the Flower tests mostly wait on Flower's 3 s polls), so a
# second worker fills the other core. --dist loadfile keeps each module (and its module fixtures)
# on one worker; --no-loadscope-reorder keeps tests/helpers_suite.py's slowest-first order.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# A device install in a fresh venv (core dependencies only, no torch) runs signature, fetch and
# infer against a real registry: tests/project/test_device_install.py (also part of `make test`).
device-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/project/test_device_install.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
