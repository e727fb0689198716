"""Local fine-tuning and evaluation of a sub-net + linear head on one node's images.

The same two functions run inside the ClientApp, in the in-process benchmark and in the
centralised baseline, so federated and central numbers differ only in how data is split.
Inputs go through `normalize_batch`, the shared evaluation transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.models.classifier import SubnetModel

FINE_TUNE_MODES = ("full", "linear")


@dataclass(frozen=True)
class LocalTrainConfig:
    """One node's local training recipe for a round."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    mode: str = "full"  # "full": every weight; "linear": frozen backbone, head only
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in FINE_TUNE_MODES:
            raise ValueError(f"unknown fine-tune mode {self.mode!r} (full or linear)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if not self.lr > 0 or self.proximal_mu < 0:
            raise ValueError("lr must be > 0 and proximal-mu >= 0")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def _tensors(images: np.ndarray, labels: np.ndarray, spec: InputSpec,
             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if labels is None:
        raise ValueError("labels are required")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    x = torch.from_numpy(normalize_batch(images, spec))
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def set_trainable(model: SubnetModel, mode: str) -> list[nn.Parameter]:
    """Put the model in training mode for `mode`; return the parameters to optimise."""
    if model.head is None:
        raise ValueError("fine-tuning needs a model with a classification head")
    model.train()
    if mode == "linear":
        model.backbone.eval()  # frozen features keep their BatchNorm statistics too
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return list(model.head.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    return list(model.parameters())


def train_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                cfg: LocalTrainConfig, progress: str | None = None) -> TrainResult:
    """SGD over the node's images for cfg.epochs; FedProx term when cfg.proximal_mu > 0.

    oneDNN is switched off while training: with torch 2.13 (oneDNN 3.12) on 2 CPU threads,
    the backward pass of narrow (8-channel) sub-nets corrupts the heap on some batch sizes
    (a segfault or "double free" that kills the ClientApp). PyTorch's native kernels are
    correct and, at the sizes fine-tuned on devices here, not the bottleneck.
    """
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return _train_local(model, images, labels, spec, cfg, progress)
    finally:
        torch.backends.mkldnn.enabled = onednn


def _train_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                 cfg: LocalTrainConfig, progress: str | None) -> TrainResult:
    if len(images) == 0:
        raise ValueError("no training images")
    x, y = _tensors(images, labels, spec, model.num_classes or 0)
    params = set_trainable(model, cfg.mode)
    anchors = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, total, steps = len(y), 0.0, 0
    bar = tqdm(total=cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size),
               desc=progress or "local training", disable=None, leave=False)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2 and cfg.mode == "full":
                continue  # BatchNorm cannot train on a batch of one
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if anchors is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            steps += 1
            bar.update(1)
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return TrainResult(total / max(cfg.epochs * n, 1), n, steps)


@torch.no_grad()
def evaluate_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                   batch_size: int = 256) -> EvalResult:
    """Cross-entropy and accuracy of the model on held-out images."""
    if len(images) == 0:
        raise ValueError("no evaluation images")
    x, y = _tensors(images, labels, spec, model.num_classes or 0)
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return EvalResult(loss / len(y), correct / len(y), len(y))
