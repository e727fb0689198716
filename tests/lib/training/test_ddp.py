"""Two real processes under torchrun with the gloo backend: the ranks split every batch,
all-reduce gradients, and end with identical weights (each rank's sha256 is gathered)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[3]

CONFIG = """
[data]
source = "builtin:digits"
image_size = 16
limit = 400
val_fraction = 0.1
[model]
widths = [8, 8, 16, 16]
stem_width = 8
[routing]
branching = [2, 2]
[ssl]
proj_dim = 32
pred_hidden = 8
batch_size = 64
[schedule]
phase0_epochs = 2
level_epochs = [1, 1]
[kit]
epochs = 0
[train]
device = "cpu"
threads = 1
knn_every = 1
"""


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    config = tmp_path / "ddp.toml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "sdr_edge_server.cli", "train", "--config", str(config), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("sdr run finished") == 1  # only rank 0 reports

    metrics = read_metrics(out)
    data = next(m for m in metrics if m.get("event") == "data")
    assert data["world_size"] == 2 and data["global_batch"] == 64
    checks = [m for m in metrics if m.get("event") == "ddp_weights"]
    assert len(checks) == 2  # after the teacher phase and after the routed levels
    for check in checks:
        assert check["world_size"] == 2 and len(check["digests"]) == 2
        assert check["digests"][0] == check["digests"][1]
    assert checks[0]["digests"][0] != checks[1]["digests"][0]
    steps = [m["steps"] for m in metrics if m.get("phase") == "phase0"]
    assert steps == [360 // 64] * 2  # each rank ran every global batch (32 images each)
    rd.verify_run_manifest(out)
    net, _ = rd.load_sdrnet(out)
    assert net.num_subnets == 4 and int(net.active_levels) == 2
