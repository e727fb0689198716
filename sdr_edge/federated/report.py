"""Per-round metrics of a federated fine-tuning run: JSON rows and a plot a person can read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdr_edge.artifacts.atomic import atomic_write, atomic_write_text


def round_rows(train: Mapping[int, Mapping[str, float]], evaluate: Mapping[int, Mapping[str, float]],
               logs: Mapping[int, dict]) -> list[dict]:
    """One row per round (0 = the routed sub-net before fine-tuning) merging every source."""
    rows = []
    for r in sorted(set(train) | set(evaluate) | set(logs)):
        row: dict = {"round": int(r)}
        row.update({k: float(v) for k, v in train.get(r, {}).items()})
        row.update({k: float(v) for k, v in evaluate.get(r, {}).items()})
        row.update({k: v for k, v in logs.get(r, {}).items() if k != "round"})
        rows.append(row)
    return rows


def metrics_json(rows: Sequence[dict], summary: Mapping[str, object]) -> bytes:
    return (json.dumps({"summary": dict(summary), "rounds": list(rows)}, indent=2,
                       sort_keys=True) + "\n").encode("utf-8")


def write_metrics(path: str | Path, rows: Sequence[dict], summary: Mapping[str, object]) -> Path:
    return atomic_write_text(path, metrics_json(rows, summary).decode("utf-8"))


def plot_rounds(path: str | Path, rows: Sequence[dict], title: str) -> Path:
    """Accuracy and losses per round (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc = [(r["round"], r["eval-accuracy"]) for r in rows if "eval-accuracy" in r]
    if acc:
        ax_acc.plot(*zip(*acc, strict=True), marker="o", label="held-out accuracy")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    for key, label in (("train-loss", "train loss"), ("eval-loss", "held-out loss")):
        pts = [(r["round"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out
