"""The training report of a run dir: figures from metrics.jsonl and the codes, plus index.html."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import numpy as np

from sdr_edge.artifacts.atomic import fsync_dir
from sdr_edge.artifacts.run_dir import CODEBOOKS, CODES, CONFIG, METRICS, REPORT_DIR, load_codes
from sdr_edge.artifacts.weights import read_metadata
from sdr_edge.report.html import ReportError, Section, update_index
from sdr_edge.report.montage import cluster_montage
from sdr_edge.report.plots import (
    MONITORS,
    phase_series,
    plot_cell_sizes,
    plot_code_histograms,
    plot_knn,
    plot_losses,
    plot_monitor,
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


def _projection_dim(run_dir: Path) -> int | None:
    """[ssl] proj_dim of the run's config.toml (the collapse monitor's 1/sqrt(d)), if readable."""
    try:
        value = tomllib.loads((run_dir / CONFIG).read_text(encoding="utf-8"))["ssl"]["proj_dim"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _last(series: dict[str, tuple[list[float], list[float]]], phase: str, fmt: str) -> str:
    values = series.get(phase, ([], []))[1]
    return format(values[-1], fmt) if values else "-"


def _training_section(run_dir: Path, report_dir: Path) -> Section | None:
    if not (run_dir / METRICS).is_file():
        return None
    metrics = read_metrics(run_dir / METRICS)
    images: list[Path] = []
    losses, knn = phase_series(metrics, "loss"), phase_series(metrics, "knn_acc")
    if losses:
        images.append(plot_losses(metrics, report_dir / "loss.png"))
    if knn:
        images.append(plot_knn(metrics, report_dir / "knn.png"))
    monitors = {key: phase_series(metrics, key) for key in MONITORS}
    d = _projection_dim(run_dir)
    for key, series in monitors.items():
        if series:
            reference = 1 / math.sqrt(d) if key == "collapse_std" and d else None
            images.append(plot_monitor(metrics, key, report_dir / MONITORS[key][0], reference))
    logged = [key for key, series in monitors.items() if series]
    header = {"collapse_std": "last collapse std", "images_per_s": "last images/s",
              "data_wait": "last data wait"}
    formats = {"collapse_std": ".4f", "images_per_s": ".0f", "data_wait": ".1%"}
    rows = [["phase", "epochs", "last loss", "last kNN acc", *(header[k] for k in logged)]]
    for phase, (epochs, values) in losses.items():
        rows.append([phase, str(len(epochs)), f"{values[-1]:.4f}", _last(knn, phase, ".3f"),
                     *(_last(monitors[k], phase, formats[k]) for k in logged)])
    if not images:
        return None
    text = ("Loss of every phase in training order (phase 0: unified SimSiam; then one "
            "progressive SiamKD phase per routing level).")
    if "collapse_std" in logged:
        text += (" The collapse monitor is the per-dimension std of the L2-normalised projector "
                 "output (SimSiam, Fig. 2): about 1/sqrt(d) while outputs spread over the "
                 "sphere, 0 when they collapse.")
    if "data_wait" in logged:
        text += " Data wait: the fraction of each epoch spent blocked on the next batch."
    return Section("Training", images, table=rows if len(rows) > 1 else None, text=text)


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


def make_training_report(run_dir: str | Path, images: np.ndarray | None = None,
                         report_dir: str | Path | None = None) -> list[Path]:
    """Write RUN_DIR/report/ (or `report_dir`): loss, kNN, the monitors metrics.jsonl carries
    (collapse, images/s, data wait), code histograms, level-1 montage and index.html.

    `images` are the training images (uint8 NHWC) in the order of the saved codes; without
    them the montage is skipped. Returns every file written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    report_dir = Path(report_dir) if report_dir is not None else run_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = [s for s in [_training_section(run_dir, report_dir)] if s is not None]
    sections += _codes_sections(run_dir, report_dir, images)
    if not sections:
        raise ReportError(f"{run_dir}: neither {METRICS} nor {CODES} is there: nothing to report")
    written = [Path(report_dir / p) for s in sections for p in s.images]
    written.append(update_index(report_dir, sections))
    return written


STAGING_PREFIX = f".{REPORT_DIR}."  # RUN/.report.XXXX.staging while a report is rebuilt


def rebuild_training_report(run_dir: str | Path) -> Path:
    """Rebuild RUN_DIR/report/ from what the run holds now (a finished, running or killed run:
    metrics.jsonl up to its last whole line, the codes if written), staged and renamed.

    The new report starts as a copy of the current one, so figures and sections that other
    stages added (routing, federated rounds, the level-1 montage of the run's own report)
    stay; the training sections are redrawn. Nothing outside report/ is written, and the old
    report is removed only file by file, the names that were copied: a file that appears in
    it meanwhile is left (with the old folder) under a hidden `.report.*.old` name.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run dir not found: {run_dir}")
    report = run_dir / REPORT_DIR
    if report.is_symlink() or (report.exists() and not report.is_dir()):
        raise ReportError(f"{report} is not a folder; refusing to replace it")
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".staging", dir=run_dir))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the published report private
    try:
        copied = []
        if report.is_dir():
            for entry in os.scandir(report):
                if entry.is_file(follow_symlinks=False) and not entry.name.endswith(".tmp"):
                    shutil.copy2(entry.path, staging / entry.name)
                    copied.append(entry.name)
        make_training_report(run_dir, report_dir=staging)
        index = report / "index.html"
        if report.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".old", dir=run_dir))
            os.replace(report, aside)  # onto the empty folder just made
            try:
                os.replace(staging, report)
            except BaseException:
                os.replace(aside, report)
                raise
            for name in copied:
                (aside / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a file written into it meanwhile: keep it
                aside.rmdir()
        else:
            os.replace(staging, report)
        fsync_dir(run_dir)
        return index
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
