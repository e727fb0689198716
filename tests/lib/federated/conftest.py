"""Fixtures shared by the in-process federation tests: one torch thread, the tiny run's assets."""

from __future__ import annotations

import pytest
import torch
from helpers_flower import federation_assets


@pytest.fixture(scope="module")
def one_thread():
    """Local training is tiny: one thread avoids OpenMP contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny run dir with its kit and the federation's key pair (built once per session)."""
    return federation_assets(tmp_path_factory.getbasetemp())
