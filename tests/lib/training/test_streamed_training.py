"""`sdr-server train` on a streamed image folder: a run SIGKILLed mid-epoch and rerun ends with
the weights of an uninterrupted one (even with DataLoader workers the reference lacked), and two
gloo ranks end with identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.artifacts.weights import load_tensors, read_metadata
from sdr_edge.data.sources import load_digits_raw
from sdr_edge.training.checkpoint import checkpoint_path
from sdr_edge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[3]

CONFIG = """
[data]
source = "{folder}"
image_size = 16
limit = 320
val_fraction = 0.1
workers = {workers}
[model]
widths = [8, 8, 16, 16]
blocks = [1, 1, 1, 1]
stem_width = 8
[routing]
branching = [2, 2]
[ssl]
proj_dim = 32
pred_hidden = 8
batch_size = 64
[schedule]
phase0_epochs = 3
level_epochs = [1, 1]
[kit]
epochs = 0
[train]
seed = 3
device = "cpu"
threads = 1
knn_every = 3
"""


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """400 scikit-learn digits as PNG files in one folder per class (read back bit-exactly)."""
    root = tmp_path_factory.mktemp("streamed") / "digits"
    images, labels = load_digits_raw()
    for i in range(400):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), images[i])
    return root


def _config(tmp_path: Path, folder: Path, workers: int) -> Path:
    path = tmp_path / f"w{workers}.toml"
    path.write_text(CONFIG.format(folder=folder, workers=workers))
    return path


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdr_edge_server.cli", "train", "--config", str(config),
            "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(config, out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_after_first_epoch(config: Path, out: Path, timeout: float = 240) -> dict:
    """SIGKILL a unified run as soon as a checkpoint shows its first epoch done: mid-way
    through the second epoch, with DataLoader workers decoding ahead."""
    proc = subprocess.Popen(_command(config, out, "--unified"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            path = checkpoint_path(out)
            meta = None
            if path.exists():
                try:
                    meta = read_metadata(path)
                except Exception:  # noqa: BLE001 - being replaced this instant; look again
                    meta = None
            if meta and meta["phase"] == "unified" and int(meta["epoch"]) >= 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return meta
            time.sleep(0.01)
        raise AssertionError("no mid-run checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_sigkill_on_a_streamed_folder_resumes_to_the_same_weights(tmp_path, digit_folder):
    """The unified run (5 epochs here) exercises the same epoch loop as phase 0 and the levels,
    without the clustering the DDP test below covers."""
    reference = tmp_path / "reference"
    _run(_config(tmp_path, digit_folder, workers=0), reference, "--unified")
    data = next(m for m in read_metrics(reference) if m.get("event") == "data")
    assert data["images"] == 320 and data["train"] == 288

    killed = tmp_path / "killed"
    config = _config(tmp_path, digit_folder, workers=2)  # workers change speed, not pixels
    meta = _kill_after_first_epoch(config, killed)
    assert not (killed / rd.MANIFEST).exists()
    proc = _run(config, killed, "--unified")
    assert "resuming from checkpoint: phase unified" in proc.stderr
    resumed = [m for m in read_metrics(killed) if m.get("event") == "resumed"]
    assert resumed == [{"event": "resumed", "phase": "unified", "epoch": meta["epoch"]}]
    for name in (rd.TEACHER,):
        a, _ = load_tensors(reference / name)
        b, _ = load_tensors(killed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"


@pytest.mark.slow
def test_two_gloo_ranks_on_a_streamed_folder_end_identical(tmp_path, digit_folder):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *_command(_config(tmp_path, digit_folder, workers=1), out)[1:]],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(out)
    data = next(m for m in metrics if m.get("event") == "data")
    assert data["world_size"] == 2 and data["images"] == 320
    checks = [m for m in metrics if m.get("event") == "ddp_weights"]
    assert len(checks) == 2
    assert all(c["digests"][0] == c["digests"][1] for c in checks)
    assert [m["steps"] for m in metrics if m.get("phase") == "phase0"] == [288 // 64] * 3
    codes, _ = rd.load_codes(out)
    assert codes.shape == (320, 2)
