"""Live tracking (sdr_edge.training.tracking): a tiny real training run writes TensorBoard
events under RUN_DIR/tensorboard/ that TensorBoard's own reader reads back, one loss value per
optimizer step on one global axis over the phases, and metrics.jsonl carries the collapse
monitor, images/s and the data-wait fraction that the report plots."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_rundir import tiny_train_config

from sdr_edge.training.config import config_from_dict
from sdr_edge.training.metrics import read_metrics
from sdr_edge.training.pipeline import train
from sdr_edge.training.siamese import output_std
from sdr_edge.training.tracking import epochs_before

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install 'sdr-edge[server]')")

TINY = tiny_train_config(data={"limit": 300})


@pytest.fixture(scope="module")
def tiny_sdr_run(tmp_path_factory):
    cfg = config_from_dict(TINY)
    out = tmp_path_factory.mktemp("track") / "run"
    train(cfg, out)
    return cfg, out


def test_tensorboard_events_hold_every_step_of_every_phase(tiny_sdr_run):
    cfg, out = tiny_sdr_run
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={
        event_accumulator.SCALARS: 0})  # 0: keep every event
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = 240 // 64  # 300 images, 20 % held out, full batches of 64
    for phase, epochs in (("phase0", 2), ("level_1", 1), ("level_2", 1)):
        loss = acc.Scalars(f"{phase}/loss")
        assert len(loss) == epochs * steps, phase
        first = epochs_before(cfg, phase) * steps
        assert [e.step for e in loss] == list(range(first, first + epochs * steps))
        assert all(math.isfinite(e.value) and e.value > -1.5 for e in loss)
        assert len(acc.Scalars(f"{phase}/lr")) == epochs * steps
        for name in ("epoch_loss", "collapse_std", "images_per_s", "data_wait", "knn_acc"):
            assert f"{phase}/{name}" in tags, (phase, name)
    lr = [e.value for e in acc.Scalars("phase0/lr")]
    assert lr[0] > lr[-1] > 0  # the cosine schedule, step by step


def test_metrics_carry_collapse_images_per_s_and_data_wait(tiny_sdr_run):
    _, out = tiny_sdr_run
    epochs = [m for m in read_metrics(out) if m.get("phase") in ("phase0", "level_1", "level_2")]
    assert len(epochs) == 4
    d = TINY["ssl"]["proj_dim"]
    for m in epochs:
        assert 0.0 < m["collapse_std"] <= 1.5 / math.sqrt(d)
        assert 0.0 <= m["data_wait"] < 1.0 and m["images_per_s"] > 0


def test_collapse_monitor_reads_zero_for_collapsed_and_one_over_sqrt_d_for_spread():
    g = torch.Generator().manual_seed(0)
    d = 64
    spread = output_std(torch.randn(4096, d, generator=g))
    assert abs(float(spread) - 1 / math.sqrt(d)) < 0.01
    collapsed = output_std(torch.randn(1, d, generator=g).expand(256, d) * 3)
    assert float(collapsed) < 1e-6
