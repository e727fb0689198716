"""Shared fixtures (tiny models, a signing key pair) and the order of modules under xdist
(tests/helpers_suite.py says why)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers_suite import slow_first_key

#: pytest-xdist sets this in its workers; 1 in a plain run.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# Up to two torch threads, shared out between the workers: two workers on two cores get one
# each instead of four threads fighting over two cores.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slowest modules first; a plain run keeps the collection order."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=lambda item: slow_first_key(item.nodeid))  # stable: modules stay whole


@pytest.fixture
def keypair(tmp_path):
    from sdr_edge.artifacts.signing import generate_keypair, load_private_key, load_public_key

    generate_keypair(tmp_path / "server.key", tmp_path / "server.pub")
    return load_private_key(tmp_path / "server.key"), load_public_key(tmp_path / "server.pub"), tmp_path
