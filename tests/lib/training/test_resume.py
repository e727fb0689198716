"""SIGKILL a real `sdr-server train` mid-run, rerun the same command: it resumes from the last
checkpoint, finishes, and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.artifacts.weights import load_tensors, read_metadata
from sdr_edge.training.checkpoint import checkpoint_path
from sdr_edge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[3]

CONFIG = """
[data]
source = "builtin:digits"
image_size = 16
limit = 700
val_fraction = 0.15
[model]
widths = [8, 16, 16, 32]
stem_width = 8
[routing]
branching = [4, 4, 4, 4]
[ssl]
proj_dim = 32
pred_hidden = 8
batch_size = 64
[schedule]
phase0_epochs = 4
level_epochs = [3, 3, 3, 3]
[kit]
epochs = 0
[train]
seed = 3
threads = 1
knn_every = 2
"""


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdr_edge_server.cli", "train", "--config", str(config), "--out", str(out)]


def run(config: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, out), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_mid_run(config: Path, out: Path, phase_prefix: str, timeout: float = 240) -> dict:
    """Start a run and SIGKILL it as soon as its checkpoint is inside a `phase_prefix` phase."""
    proc = subprocess.Popen(command(config, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            path = checkpoint_path(out)
            if path.exists():
                try:
                    meta = read_metadata(path)
                except Exception:  # noqa: BLE001 - being replaced this instant; look again
                    meta = None
                if meta and meta["phase"].startswith(phase_prefix):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    return meta
            time.sleep(0.02)
        raise AssertionError("no mid-run checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text(CONFIG)
    reference = tmp_path / "reference"
    assert run(config, reference).returncode == 0

    out = tmp_path / "killed"
    meta = kill_mid_run(config, out, "level_")
    assert not (out / rd.MANIFEST).exists()
    assert not list(out.rglob("*.tmp")), "a temporary file survived the kill"

    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint: phase level_" in proc.stderr
    assert "resumed and finished" in proc.stdout
    rd.verify_run_manifest(out)
    assert set(rd.verify_run_manifest(out)["files"]) == set(
        rd.verify_run_manifest(reference)["files"])

    metrics = read_metrics(out)
    resumed = [m for m in metrics if m.get("event") == "resumed"]
    assert resumed == [{"event": "resumed", "phase": meta["phase"], "epoch": meta["epoch"]}]
    epochs = [(m["phase"], m["epoch"]) for m in metrics if "loss" in m]
    assert len(epochs) == len(set(epochs)), "an epoch was logged twice"
    assert epochs == [(m["phase"], m["epoch"]) for m in read_metrics(reference) if "loss" in m]

    # same seeds, epoch-derived RNG and restored optimizer state: the very same weights
    for name in (rd.TEACHER, rd.CODES, rd.CODEBOOKS, rd.SDRNET):
        a, _ = load_tensors(reference / name)
        b, _ = load_tensors(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
