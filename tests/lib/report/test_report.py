"""The training report: every figure is written, decodes, and index.html links them all."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch

from sdr_edge.artifacts.run_dir import REPORT_DIR, save_codebooks, save_codes
from sdr_edge.data.sources import load_source
from sdr_edge.report import Section, make_training_report, read_metrics, update_index
from sdr_edge.report.montage import (
    GAP_PX,
    HEADER_PX,
    LABEL_PX,
    SEPARATOR_BGR,
    SEPARATOR_PX,
    montage_array,
    row_height,
)
from sdr_edge.report.plots import phase_series, phase_spans

BRANCHING = (4, 3, 2)


def write_metrics(path, knn: bool = True) -> None:
    lines = [{"event": "start", "seed": 0}]
    for phase, epochs in [("phase0", 4), ("cluster", 1), ("level1", 2), ("level2", 2),
                          ("level3", 2)]:
        for epoch in range(epochs):
            if phase == "cluster":  # the pipeline logs its quantisation residual as a "loss"
                lines.append({"phase": phase, "epoch": 1, "loss": 0.42, "knn_acc": None,
                              "time": 1.5, "backend": "faiss"})
                continue
            lines.append({"phase": phase, "epoch": epoch, "loss": -0.3 - 0.05 * epoch,
                          "knn_acc": (0.4 + 0.1 * epoch) if knn else None})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def digits():
    return load_source("builtin:digits", 16, 1, limit=400)


def make_run(tmp_path, digits, knn: bool = True):
    """A run dir with the files training writes: metrics, codes, codebooks."""
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, b, size=len(digits)) for b in BRANCHING], axis=1)
    codes[:4, 0] = np.arange(4)  # every level-1 cluster holds at least one image
    save_codes(tmp_path, torch.from_numpy(codes), "builtin:digits")
    save_codebooks(tmp_path, [torch.zeros(b, 8) for b in BRANCHING])
    write_metrics(tmp_path / "metrics.jsonl", knn=knn)
    return tmp_path


def separator_rows(image: np.ndarray) -> int:
    """Runs of full-width rows painted in the montage's separator colour."""
    full = np.all(image == np.array(SEPARATOR_BGR, dtype=np.uint8), axis=(1, 2))
    return int(np.sum(full[1:] & ~full[:-1]) + full[0])


def test_training_report_writes_every_figure(tmp_path, digits):
    run = make_run(tmp_path, digits)
    written = make_training_report(run, digits.images)
    names = {p.name for p in written}
    expected = {"loss.png", "knn.png", "codes_level_1.png", "codes_level_2.png",
                "codes_level_3.png", "cells.png", "clusters_level1.png", "index.html"}
    assert expected <= names
    for path in written:
        assert path.parent == run / REPORT_DIR and path.is_file()
        if path.suffix == ".png":
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            assert image is not None, f"{path.name} does not decode"
            assert image.shape[0] > 100 and image.shape[1] > 200
            assert image.std() > 10, f"{path.name} is blank"
    index = (run / REPORT_DIR / "index.html").read_text()
    linked = set(re.findall(r'<img src="([^"]+)"', index))
    assert {p.name for p in written if p.suffix == ".png"} == linked
    assert "phase0" in index and "level3" in index  # the per-phase table
    assert "<td>cluster</td>" not in index  # the clustering residual is not a training loss
    assert "mean squared residual 0.4200" in index


def test_montage_has_one_row_per_cluster(tmp_path, digits):
    run = make_run(tmp_path, digits)
    make_training_report(run, digits.images)
    montage = cv2.imread(str(run / REPORT_DIR / "clusters_level1.png"), cv2.IMREAD_COLOR)
    assert separator_rows(montage) == BRANCHING[0] + 1  # a line above, between and below rows


def test_montage_rows_hold_the_cluster_images():
    images = np.zeros((30, 8, 8, 1), dtype=np.uint8)
    codes = np.repeat(np.arange(3), 10)
    images[codes == 1] = 255  # cluster 1 is all white, the others black
    canvas = montage_array(images, codes, per_cluster=5, tile=16, n_clusters=5)
    assert separator_rows(canvas) == 6  # empty clusters 3 and 4 still get a row
    row_h = row_height(16)
    for cluster, value in [(0, 0), (1, 255), (2, 0)]:
        top = HEADER_PX + SEPARATOR_PX + cluster * (row_h + SEPARATOR_PX) + (row_h - 16) // 2
        first_tile = canvas[top:top + 16, LABEL_PX + GAP_PX:LABEL_PX + GAP_PX + 16]
        assert (first_tile == value).all(), f"row {cluster} shows another cluster's images"


def test_montage_needs_images_in_code_order(tmp_path, digits):
    run = make_run(tmp_path, digits)
    with pytest.raises(ValueError, match="same order as the codes"):
        make_training_report(run, digits.images[:-1])


def test_no_knn_figure_without_labels(tmp_path, digits):
    run = make_run(tmp_path, digits, knn=False)
    names = {p.name for p in make_training_report(run)}
    assert "loss.png" in names and "knn.png" not in names
    assert "clusters_level1.png" not in names  # no images given: no montage


def test_other_sections_survive_a_rerun(tmp_path, digits):
    run = make_run(tmp_path, digits)
    report = run / REPORT_DIR
    make_training_report(run)
    cv2.imwrite(str(report / "routing.png"), np.full((20, 20, 3), 128, np.uint8))
    update_index(report, [Section("Routing", [report / "routing.png"],
                                  table=[["task", "regret"], ["a", "0.01"]])])
    make_training_report(run, digits.images)
    index = (report / "index.html").read_text()
    assert 'src="routing.png"' in index and "<td>0.01</td>" in index
    assert 'src="clusters_level1.png"' in index
    assert index.count("<h2>Training</h2>") == 1
    assert 'id="level-1-clusters"' in index and 'href="#level-1-clusters"' in index


def test_read_metrics_tolerates_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "phase0", "epoch": 0, "loss": 1.0}\n{"phase": "pha')
    assert read_metrics(path) == [{"phase": "phase0", "epoch": 0, "loss": 1.0}]
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_empty_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        make_training_report(tmp_path)


def test_phases_share_one_epoch_axis():
    # kNN logged every other epoch must line up with the loss of the same epochs
    metrics = [{"phase": "phase0", "epoch": e, "loss": 1.0, "knn_acc": 0.5 if e % 2 == 0 else None}
               for e in range(1, 5)]
    metrics += [{"phase": "cluster", "epoch": 1, "loss": 0.3},
                {"phase": "level_1", "epoch": 1, "loss": 0.5, "knn_acc": None},
                {"phase": "level_1", "epoch": 2, "loss": 0.4, "knn_acc": 0.7}]
    assert phase_spans(metrics) == {"phase0": (1.0, 1.0), "level_1": (1.0, 5.0)}
    assert phase_series(metrics, "knn_acc") == {"phase0": ([2.0, 4.0], [0.5, 0.5]),
                                                "level_1": ([2.0], [0.7])}
