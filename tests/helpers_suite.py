"""The suite's split over pytest-xdist workers: which modules go first (tests/conftest.py).

`make test` runs two workers with `--dist loadfile --no-loadscope-reorder`: a module's tests,
and so its module fixtures, stay on one worker, and modules are handed out in collection order
to whichever worker is free. Under xdist the modules in SLOW_FIRST go first, longest first, so
that no long module starts near the end while the other worker has nothing left to do
(longest-processing-time-first scheduling). A plain `pytest` keeps the collection order.
"""

from __future__ import annotations

#: The modules that took longest (seconds, in a plain run at load ~7 on the 2-core box,
#: 2026-12-01); tests/project/test_suite_layout.py checks that each still exists.
SLOW_FIRST = (
    "tests/lib/federated/test_federation_e2e.py",  # 410: three Deployment Engine runs
    "tests/lib/fleet/test_federation_tls.py",  # 115
    "tests/lib/training/test_training.py",  # 95
    "tests/lib/federated/test_simulation.py",  # 64
    "tests/lib/training/test_resume.py",  # 55
    "tests/lib/bench/test_paper_claim.py",  # 55
    "tests/lib/training/test_streamed_training.py",  # 47
    "tests/lib/federated/test_federated_strategies.py",  # 40
    "tests/project/test_packaging.py",  # 30
    "tests/project/test_device_install.py",  # 25
    "tests/lib/training/test_ddp.py",  # 20
)


def slow_first_key(nodeid: str) -> int:
    """Sort key of a test id: its module's place in SLOW_FIRST, every other module after."""
    module = nodeid.split("::", 1)[0]
    return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)
