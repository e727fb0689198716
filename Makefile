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

test: $(STAMP)
	$(PY) -m pytest -q

# A device install in a fresh venv (core dependencies only, no torch) runs signature, fetch and
# infer against a real registry: tests/project/test_device_install.py (also part of `make test`).
device-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/project/test_device_install.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
