"""Live tracking of a training run: TensorBoard event files under RUN_DIR/tensorboard/, and
MLflow when MLFLOW_TRACKING_URI is set. Only rank 0 writes.

Per step: the loss and the learning rate. Per epoch: the epoch's mean loss, the kNN monitor,
the collapse monitor (SimSiam, Chen & He 2021, Fig. 2: the per-dimension std of the
L2-normalised projector output, averaged; about 1/sqrt(d) when healthy, 0 when collapsed),
images/s and the fraction of the epoch spent waiting for the next batch. Tags are
`PHASE/NAME`; every step is global over the run (phase 0, then the level phases), so a run's
phases line up on one axis and a resumed run continues where its checkpoint was.

A resumed run replays epochs that a killed process may already have logged: the writer opens
with `purge_step` at the first step it logs, so TensorBoard hides the killed process's events
from that step on. Events are flushed at every epoch end (a kill loses at most one epoch).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sdr_edge.artifacts.run_dir import TENSORBOARD_DIR
from sdr_edge.training.config import TrainConfig

log = logging.getLogger(__name__)

EPOCH_KEYS = ("loss", "collapse_std", "images_per_s", "data_wait")


def epochs_before(cfg: TrainConfig, phase: str) -> int:
    """Training epochs of the phases that come before `phase` (its offset on the run's axis)."""
    if phase.startswith("level_"):
        r = int(phase.split("_", 1)[1]) - 1
        return cfg.schedule.phase0_epochs + sum(cfg.schedule.level_epochs[:r])
    return 0


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = str(value)
    return out


class RunTracker:
    """Opens its writers lazily, at the first value logged; a no-op when `enabled` is false."""

    def __init__(self, run_dir: str | Path, cfg: TrainConfig, *, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled
        self._writer: Any = None
        self._mlflow: Any = None
        self._opened = False

    # ----- writers ------------------------------------------------------------------------

    def _open(self, first_step: int) -> None:
        self._opened = True
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install 'sdr-edge[server]'): no "
                        "TensorBoard events in %s", self.run_dir / TENSORBOARD_DIR)
        else:
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=first_step, flush_secs=30)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                import mlflow
            except ImportError:
                log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed (pip "
                            "install mlflow): tracking to TensorBoard only")
            else:
                mlflow.start_run(run_name=self.run_dir.name,
                                 tags={"sdr_edge.run_dir": str(self.run_dir.resolve())})
                mlflow.log_params(_flat("", self.cfg.to_dict(), {}))
                self._mlflow = mlflow

    def _log(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open(step)
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(values, step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writers (the run dir's manifest is written after this)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
        self._opened = False

    # ----- what the training loop reports -------------------------------------------------

    def phase(self, phase: str) -> PhaseTracker:
        return PhaseTracker(self, phase, epochs_before(self.cfg, phase))


class PhaseTracker:
    """One training phase's view of the tracker: steps and epochs counted within the phase."""

    def __init__(self, tracker: RunTracker, phase: str, offset_epochs: int) -> None:
        self.tracker = tracker
        self.phase = phase
        self.offset = offset_epochs

    def global_step(self, epoch: int, step: int, steps_per_epoch: int) -> int:
        return (self.offset + epoch) * steps_per_epoch + step

    def step(self, epoch: int, step: int, steps_per_epoch: int, loss: float, lr: float) -> None:
        """After optimizer step `step` (0-based) of epoch `epoch` (0-based) of the phase."""
        self.tracker._log({f"{self.phase}/loss": loss, f"{self.phase}/lr": lr},
                          self.global_step(epoch, step, steps_per_epoch))

    def epoch(self, epoch: int, stats: dict[str, Any], knn_acc: float | None) -> None:
        """After epoch `epoch` (1-based, as metrics.jsonl counts) with train_epoch's stats."""
        values = {f"{self.phase}/epoch_{k}" if k == "loss" else f"{self.phase}/{k}": float(stats[k])
                  for k in EPOCH_KEYS if stats.get(k) is not None}
        if knn_acc is not None:
            values[f"{self.phase}/knn_acc"] = float(knn_acc)
        steps = int(stats.get("steps") or 0)
        self.tracker._log(values, self.global_step(epoch, 0, steps))
        self.tracker.flush()
