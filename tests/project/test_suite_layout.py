"""The suite's split over pytest-xdist workers (tests/helpers_suite.py) still matches the tree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from helpers_suite import SLOW_FIRST, slow_first_key

REPO = Path(__file__).resolve().parents[2]


def test_slow_first_names_existing_modules_once_and_orders_by_module():
    missing = [p for p in SLOW_FIRST if not (REPO / p).is_file()]
    assert not missing, f"tests/helpers_suite.py SLOW_FIRST names modules that are gone: {missing}"
    assert len(set(SLOW_FIRST)) == len(SLOW_FIRST)
    ids = ["tests/apps/a.py::t1", f"{SLOW_FIRST[1]}::t", "tests/apps/a.py::t2",
           f"{SLOW_FIRST[0]}::t[x]"]
    assert sorted(ids, key=slow_first_key) == [ids[3], ids[1], ids[0], ids[2]]


def test_make_test_runs_two_workers_by_file_and_dev_installs_xdist():
    target = re.search(r"^test:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert target, "Makefile has no test target"
    recipe = target.group(1)
    # loadfile keeps module fixtures (the Deployment Engine fleet, the tiny training run) on
    # one worker; without --no-loadscope-reorder xdist sorts modules by test count instead
    for option in ("-n ", "--dist loadfile", "--no-loadscope-reorder"):
        assert option in recipe, f"make test lost {option!r}: {recipe}"
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert any(d.startswith("pytest-xdist") for d in dev), dev
