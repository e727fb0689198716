"""Shared fixtures: tiny models and a signing key pair."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def keypair(tmp_path):
    from sdr_edge.artifacts.signing import generate_keypair, load_private_key, load_public_key

    generate_keypair(tmp_path / "server.key", tmp_path / "server.pub")
    return load_private_key(tmp_path / "server.key"), load_public_key(tmp_path / "server.pub"), tmp_path
