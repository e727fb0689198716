"""Training figures: loss and kNN accuracy per phase, how the data spreads over the codes.

matplotlib with the Agg backend (no display needed); every figure is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sdr_edge.artifacts.atomic import atomic_write  # noqa: E402
from sdr_edge.report.html import ReportError  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """Every JSON object in metrics.jsonl; a torn last line (a killed run) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # the process died mid-write; everything before it is intact
            raise ReportError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if isinstance(record, dict):
            records.append(record)
    return records


NOT_TRAINING = frozenset({"cluster", "kit", "done"})
"""Pipeline steps that log a phase record but whose "loss" is not a training loss (the
clustering step logs its quantisation residual there)."""


def phase_series(metrics: Sequence[dict], key: str,
                 exclude: frozenset[str] = NOT_TRAINING) -> dict[str, tuple[list[float], list[float]]]:
    """Per training phase (in order of appearance): epochs and values of `key`, last one wins.

    A resumed run logs some epochs twice; keeping the last record per (phase, epoch) shows the
    run that produced the weights.
    """
    per_phase: dict[str, dict[float, float]] = {}
    for record in metrics:
        if "phase" not in record or "epoch" not in record or record.get(key) is None:
            continue
        if str(record["phase"]) in exclude:
            continue
        per_phase.setdefault(str(record["phase"]), {})[float(record["epoch"])] = float(record[key])
    return {phase: (sorted(points), [points[e] for e in sorted(points)])
            for phase, points in per_phase.items()}


def _save(fig: Figure, path: str | Path) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)


def phase_spans(metrics: Sequence[dict],
                exclude: frozenset[str] = NOT_TRAINING) -> dict[str, tuple[float, float]]:
    """Per training phase: (first epoch, x of its first epoch on the shared axis).

    Spans come from every record of a phase, so loss.png and knn.png (which may be logged
    every few epochs only) put the same epoch at the same x.
    """
    epochs: dict[str, list[float]] = {}
    for record in metrics:
        if "phase" in record and "epoch" in record and str(record["phase"]) not in exclude:
            epochs.setdefault(str(record["phase"]), []).append(float(record["epoch"]))
    spans, start = {}, 1.0
    for phase, values in epochs.items():
        spans[phase] = (min(values), start)
        start += max(values) - min(values) + 1
    return spans


def _plot_phases(series: dict[str, tuple[list[float], list[float]]],
                 spans: dict[str, tuple[float, float]], path: str | Path,
                 ylabel: str, title: str, level: tuple[float, str] | None = None) -> Path:
    """Phases one after another on a shared epoch axis, each in its own colour; `level`
    (value, label) is a dotted horizontal reference."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for phase, (first, x0) in spans.items():
        if x0 > 1:
            ax.axvline(x0 - 0.5, color="#bbb", linewidth=0.8, linestyle="--")
        if phase in series:
            epochs, values = series[phase]
            ax.plot([x0 + e - first for e in epochs], values, marker="o", markersize=3,
                    label=phase)
    if level is not None:
        ax.axhline(level[0], color="#c44e52", linestyle=":", linewidth=1, label=level[1])
        ax.set_ylim(bottom=0.0)
    ax.set_xlabel("epoch (phases in training order)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_losses(metrics: Sequence[dict], path: str | Path) -> Path:
    """loss.png: the training loss of every phase over its epochs."""
    series = phase_series(metrics, "loss")
    if not series:
        raise ReportError("no metrics record has phase, epoch and loss: nothing to plot")
    return _plot_phases(series, phase_spans(metrics), path, "loss", "training loss per phase")


def plot_knn(metrics: Sequence[dict], path: str | Path) -> Path:
    """knn.png: the kNN monitor accuracy per phase (only runs whose data has labels log it)."""
    series = phase_series(metrics, "knn_acc")
    if not series:
        raise ReportError("no metrics record has a knn_acc value: nothing to plot")
    return _plot_phases(series, phase_spans(metrics), path, "kNN accuracy",
                        "kNN monitor accuracy (labels used only for monitoring)")


MONITORS = {
    # metrics.jsonl key -> (file, y label, title); plotted when the run logged the key
    "collapse_std": ("collapse.png", "std of L2-normalised z (mean over dims)",
                     "collapse monitor (SimSiam Fig. 2): ~1/sqrt(d) healthy, 0 collapsed"),
    "images_per_s": ("throughput.png", "images / s (all ranks)", "training throughput"),
    "data_wait": ("data_wait.png", "fraction of the epoch",
                  "time blocked waiting for the next batch"),
}


def plot_monitor(metrics: Sequence[dict], key: str, path: str | Path,
                 reference: float | None = None) -> Path:
    """One of MONITORS per phase on the shared epoch axis; `reference` draws a dotted level
    (for the collapse monitor: 1/sqrt(d), the std of outputs spread over the sphere)."""
    series = phase_series(metrics, key)
    if not series:
        raise ReportError(f"no metrics record has a {key} value: nothing to plot")
    _, ylabel, title = MONITORS[key]
    level = None if reference is None else (reference, f"1/sqrt(d) = {reference:.3f}")
    return _plot_phases(series, phase_spans(metrics), path, ylabel, title, level)


def plot_code_histograms(codes: np.ndarray, branching: Sequence[int],
                         report_dir: str | Path) -> list[Path]:
    """codes_level_{r}.png for r = 1..R: how many images took each digit at level r."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(branching):
        raise ValueError(f"codes of shape {codes.shape} do not match branching {list(branching)}")
    paths = []
    for r, b in enumerate(branching):
        counts = np.bincount(codes[:, r], minlength=int(b))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(counts) + 2), 3.5))
        bars = ax.bar(np.arange(len(counts)), counts, color="#4c72b0")
        ax.axhline(len(codes) / len(counts), color="#c44e52", linestyle="--", linewidth=1,
                   label="uniform")
        if len(counts) <= 32:
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(np.arange(len(counts)))
        ax.set_xlabel(f"digit b_{r + 1} (expert at level {r + 1})")
        ax.set_ylabel("images")
        empty = int((counts == 0).sum())
        ax.set_title(f"level {r + 1}: {len(codes)} images over {len(counts)} clusters"
                     + (f", {empty} empty" if empty else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, Path(report_dir) / f"codes_level_{r + 1}.png"))
    return paths


def plot_cell_sizes(codes: np.ndarray, branching: Sequence[int], path: str | Path) -> Path:
    """cells.png: images per full route (sub-net), largest first, with the empty routes counted."""
    codes = np.asarray(codes)
    cells = np.ravel_multi_index(tuple(codes.T), tuple(int(b) for b in branching))
    counts = np.sort(np.bincount(cells, minlength=int(np.prod(branching))))[::-1]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(np.arange(len(counts)), counts, width=1.0, color="#55a868")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # empty routes have no bar
    ax.set_xlabel("route (sub-net), sorted by size")
    ax.set_ylabel("images (log)")
    ax.set_title(f"{len(counts)} routes: {int((counts > 0).sum())} hold images, median "
                 f"{int(np.median(counts))}, largest {int(counts[0])}")
    fig.tight_layout()
    return _save(fig, path)
