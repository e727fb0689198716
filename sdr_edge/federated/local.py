"""Local fine-tuning and evaluation of a sub-net + linear head on one node's images.

The same two functions run inside the ClientApp, in the in-process benchmark, in the
centralised baseline and in the paper-claim bench, so federated and central numbers differ
only in how data is split. The recipe itself (LP-FT, two learning rates, warm-up + cosine,
light augmentation, BatchNorm mode) and its defaults live in `sdr_edge.training.finetune`.
Inputs go through `normalize_batch`, the shared evaluation transform.
"""

from __future__ import annotations

import numpy as np
import torch

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.training.finetune import (
    FINE_TUNE_MODES,
    EvalResult,
    FineTuneConfig,
    TrainResult,
    evaluate,
    fine_tune,
    set_trainable,
)

LocalTrainConfig = FineTuneConfig  # one recipe; the old name stays for the Flower path

__all__ = ["FINE_TUNE_MODES", "EvalResult", "LocalTrainConfig", "TrainResult", "evaluate_local",
           "set_trainable", "train_local"]


def train_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                cfg: LocalTrainConfig, progress: str | None = None) -> TrainResult:
    """Fine-tune with the recipe `cfg`; FedProx term when cfg.proximal_mu > 0.

    oneDNN is switched off while training: with torch 2.13 (oneDNN 3.12) on 2 CPU threads,
    the backward pass of narrow (8-channel) sub-nets corrupts the heap on some batch sizes
    (a segfault or "double free" that kills the ClientApp). PyTorch's native kernels are
    correct and, at the sizes fine-tuned on devices here, not the bottleneck.
    """
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return fine_tune(model, images, labels, spec, cfg, progress or "local training")
    finally:
        torch.backends.mkldnn.enabled = onednn


def evaluate_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                   batch_size: int = 256) -> EvalResult:
    """Cross-entropy and accuracy of the model on held-out images."""
    return evaluate(model, images, labels, spec, batch_size)
