"""metrics.jsonl: one JSON object per line, appended by rank 0 only.

Training lines carry `phase`, `epoch`, `loss`, `knn_acc` and `time`; events (skipped images,
resume, DDP weight check) carry an `event` key. A checkpoint records the file's size, and a
resumed run cuts the file back to it, so replayed epochs are never logged twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sdr_edge.artifacts.run_dir import METRICS


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON-lines log; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Forget everything logged after a checkpoint (the epochs will be replayed)."""
        if self.enabled and self.path.exists() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def epoch(self, phase: str, epoch: int, loss: float | None, knn_acc: float | None,
              seconds: float, **extra: Any) -> None:
        self.write({"phase": phase, "epoch": epoch, "loss": loss, "knn_acc": knn_acc,
                    "time": seconds, **extra})

    def event(self, event: str, **fields: Any) -> None:
        self.write({"event": event, **fields})


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (empty list when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
