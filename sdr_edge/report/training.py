"""The training report of a run dir: figures from metrics.jsonl and the codes, plus index.html."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.artifacts.run_dir import CODEBOOKS, CODES, METRICS, REPORT_DIR, load_codes
from sdr_edge.artifacts.weights import read_metadata
from sdr_edge.report.html import ReportError, Section, update_index
from sdr_edge.report.montage import cluster_montage
from sdr_edge.report.plots import (
    phase_series,
    plot_cell_sizes,
    plot_code_histograms,
    plot_knn,
    plot_losses,
    read_metrics,
)


def run_branching(run_dir: Path, codes: np.ndarray, meta: dict) -> list[int]:
    """Clusters per level: from the codebooks when saved (a trailing empty cluster still counts)."""
    if (run_dir / CODEBOOKS).is_file():
        book_meta = read_metadata(run_dir / CODEBOOKS) or {}
        if "branching" in book_meta:
            return [int(b) for b in book_meta["branching"]]
    sizes = meta.get("cluster_sizes")
    if sizes:
        return [len(s) for s in sizes]
    return [int(codes[:, r].max()) + 1 for r in range(codes.shape[1])]


def _training_section(run_dir: Path, report_dir: Path) -> Section | None:
    if not (run_dir / METRICS).is_file():
        return None
    metrics = read_metrics(run_dir / METRICS)
    images: list[Path] = []
    rows = [["phase", "epochs", "last loss", "last kNN acc"]]
    losses, knn = phase_series(metrics, "loss"), phase_series(metrics, "knn_acc")
    if losses:
        images.append(plot_losses(metrics, report_dir / "loss.png"))
    if knn:
        images.append(plot_knn(metrics, report_dir / "knn.png"))
    for phase, (epochs, values) in losses.items():
        acc = knn.get(phase, ([], []))[1]
        rows.append([phase, str(len(epochs)), f"{values[-1]:.4f}",
                     f"{acc[-1]:.3f}" if acc else "-"])
    if not images:
        return None
    return Section("Training", images, table=rows if len(rows) > 1 else None,
                   text="Loss of every phase in training order (phase 0: unified SimSiam; "
                        "then one progressive SiamKD phase per routing level).")


def _clustering_note(run_dir: Path) -> str:
    """What the clustering step logged (backend, quantisation residual, seconds), if anything."""
    if not (run_dir / METRICS).is_file():
        return ""
    records = [r for r in read_metrics(run_dir / METRICS) if r.get("phase") == "cluster"]
    if not records:
        return ""
    last = records[-1]
    parts = [f"backend {last['backend']}" if last.get("backend") else "",
             f"mean squared residual {last['loss']:.4f}" if last.get("loss") is not None else "",
             f"{last['time']:.1f} s" if last.get("time") is not None else ""]
    return " Clustering: " + ", ".join(p for p in parts if p) + "."


def _codes_sections(run_dir: Path, report_dir: Path, images: np.ndarray | None) -> list[Section]:
    if not (run_dir / CODES).is_file():
        return []
    codes_t, meta = load_codes(run_dir)
    codes = codes_t.numpy()
    branching = run_branching(run_dir, codes, meta)
    figures = plot_code_histograms(codes, branching, report_dir)
    figures.append(plot_cell_sizes(codes, branching, report_dir / "cells.png"))
    table = [["level", "clusters", "smallest", "largest", "empty"]]
    for r, b in enumerate(branching):
        counts = np.bincount(codes[:, r], minlength=b)
        table.append([str(r + 1), str(b), str(counts.min()), str(counts.max()),
                      str(int((counts == 0).sum()))])
    sections = [Section("Routing codes", figures, table=table,
                        text=f"Residual k-means codes of {len(codes)} training images "
                             f"(branching {'x'.join(map(str, branching))})."
                             + _clustering_note(run_dir))]
    if images is not None:
        montage = cluster_montage(images, codes[:, 0], report_dir / "clusters_level1.png",
                                  n_clusters=branching[0])
        sections.append(Section("Level-1 clusters", [montage],
                                text="Sample training images of every level-1 cluster: what "
                                     "each first-level expert is trained on."))
    return sections


def make_training_report(run_dir: str | Path, images: np.ndarray | None = None) -> list[Path]:
    """Write RUN_DIR/report/: loss, kNN, code histograms, level-1 montage and index.html.

    `images` are the training images (uint8 NHWC) in the order of the saved codes; without
    them the montage is skipped. Returns every file written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    report_dir = run_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = [s for s in [_training_section(run_dir, report_dir)] if s is not None]
    sections += _codes_sections(run_dir, report_dir, images)
    if not sections:
        raise ReportError(f"{run_dir}: neither {METRICS} nor {CODES} is there: nothing to report")
    written = [Path(report_dir / p) for s in sections for p in s.images]
    written.append(update_index(report_dir, sections))
    return written
