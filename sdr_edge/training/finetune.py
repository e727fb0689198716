"""The fine-tuning recipe every device, benchmark and baseline runs: one place for its defaults.

A constant SGD learning rate on every weight from a random head (the old recipe: 3 epochs at
0.05) scored below the frozen linear probe of the same model and varied by up to 15 points
across seeds. The defaults here were chosen by measurement (benchmarks/finetune_recipe.py, a
unified small ResNet, footwear-3 and digits, 3 seeds): fine-tune 94.4 +- 0.3 / 99.1 +- 0.1 %
against probe 85.0 / 88.0 % and old recipe 70.1 +- 1.9 / 75.3 +- 15.3 %.

* 20 epochs. At 10, the glyph tasks of the mixed pool (1,400 training images, 24-37 classes)
  ended under-trained: 84-93 % on average, with a spread of up to 2.5 points over fine-tune
  seeds. At 20 they reach 97-99 % with a spread of at most 1.0, and the fashion tasks and
  digits gain 0.6-3.2 points
  (docs/claim.md "Is fine-tuning stable?", 3 models x 6 tasks x 3 seeds). Federated rounds set
  their own local epochs;
* AdamW with a per-step schedule: linear warm-up over 10 % of *this call's* steps, then cosine
  decay. Measured on the mixed-pool tasks (docs/claim.md "Is fine-tuning stable?", 5 fine-tune
  seeds on one model and split): std 1.38 / 0.80 / 0.58 points on cyrillic / tops-4 / greek against
  1.58 / 1.80 / 0.35 without warm-up, means equal or higher (83.8 / 72.3 / 95.6 vs 83.5 / 72.1 /
  95.1). Federated rounds set their own warm-up (the server's round schedule: 30 % of round 1);
* two parameter groups, head at `lr` and backbone at `lr * backbone_lr_scale` (1.0 measured
  best with AdamW: 0.25 lost 0.5-1.8 points on footwear-3 and digits, 2-14 on the mixed-pool
  glyph and fashion tasks, docs/claim.md "Is fine-tuning stable?");
* light augmentation (small shift and zoom; horizontal flip only when asked: it changes
  digits and letters); on footwear-3 it neither helped nor hurt (94.4 without), kept as a
  guard against over-fitting longer runs;
* BatchNorm on purpose: "train" (default) re-estimates the running statistics on the task's
  batches, "frozen" keeps the pre-trained ones (BN layers in eval mode, their scale and shift
  still train; measured 0.5-3.3 points worse, it stays for tiny local sets);
* optional LP-FT (Kumar et al. 2022): the head starts at the linear probe's solution
  (logistic regression on standardised frozen features, folded into the linear layer);
  measured 92.8 on footwear-3 (its folded head has large weights, so SGD diverges with it);
  SGD (lr 0.05, backbone x 0.1, same schedule) reached 91.7;
* optional label smoothing and FedProx's proximal term; deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from sdr_edge.data.augment import light_augment
from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.errors import SdrEdgeError
from sdr_edge.models.classifier import SubnetModel

log = logging.getLogger(__name__)

FINE_TUNE_MODES = ("full", "linear")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BN_MODES = ("frozen", "train")


# A federated round is a short call (one local epoch by default), and each call runs its own
# cosine decay: a round sees few steps at half the peak rate on average. Three rounds of one
# epoch on 700 built-in digits per node from the tiny test run reached 0.44 / 0.78 / 0.93
# accuracy at 1e-3 / 3e-3 / 1e-2; 3e-3 is the Flower run config's default, a compromise
# with the 1e-3 that measured best for ten-epoch central fine-tuning of pre-trained features.
ROUND_LR = 3e-3


class FineTuneError(SdrEdgeError, ValueError):
    """A fine-tune setting or its data cannot be used (a bad flag, label or empty set)."""


@dataclass(frozen=True)
class FineTuneConfig:
    """One fine-tuning call's recipe. `lr` is the head's peak rate; the backbone gets
    `lr * backbone_lr_scale`."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 32
    mode: str = "full"  # "full": every weight; "linear": frozen backbone, head only
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05  # decoupled (AdamW); SGD's L2 wants ~5e-4
    seed: int = 0
    backbone_lr_scale: float = 1.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_fraction: float = 0.1  # share of this call's steps spent warming up linearly
    min_lr_fraction: float = 0.0  # cosine ends at lr * min_lr_fraction
    probe_init: bool = False  # LP-FT: start the head at the linear probe's solution
    bn: str = "train"
    augment: bool = True
    flip: bool = False
    label_smoothing: float = 0.0
    logit_adjust: float = 0.0  # tau: train on logits + tau * log(local label prior)

    def __post_init__(self) -> None:
        if self.mode not in FINE_TUNE_MODES:
            raise FineTuneError(f"unknown fine-tune mode {self.mode!r} (full or linear)")
        if self.epochs < 1 or self.batch_size < 1:
            raise FineTuneError("epochs and batch size must be >= 1")
        if not self.lr > 0 or self.proximal_mu < 0:
            raise FineTuneError("lr must be > 0 and proximal-mu >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise FineTuneError(f"unknown optimizer {self.optimizer!r} (one of {OPTIMIZERS})")
        if self.schedule not in SCHEDULES:
            raise FineTuneError(f"unknown lr schedule {self.schedule!r} (one of {SCHEDULES})")
        if self.bn not in BN_MODES:
            raise FineTuneError(f"unknown BatchNorm mode {self.bn!r} (one of {BN_MODES})")
        if not 0 < self.backbone_lr_scale <= 10:
            raise FineTuneError("backbone-lr-scale must be in (0, 10]")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
            raise FineTuneError("warmup-fraction must be in [0, 1) and min-lr-fraction in [0, 1]")
        if not 0 <= self.logit_adjust <= 2:
            raise FineTuneError("logit-adjust must be in [0, 2]")
        if not 0 <= self.label_smoothing < 1 or self.weight_decay < 0 or self.momentum < 0:
            raise FineTuneError("label-smoothing must be in [0, 1), weight-decay and momentum >= 0")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int


def lr_factor(step: int, total: int, cfg: FineTuneConfig) -> float:
    """Multiplier of the peak lr at optimiser step `step` of `total` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    warmup = int(round(cfg.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: SubnetModel, cfg: FineTuneConfig) -> list[dict]:
    """Head at cfg.lr, backbone at cfg.lr * backbone_lr_scale (absent in linear mode)."""
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
    if cfg.mode == "full":
        groups.append({"params": list(model.backbone.parameters()),
                       "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"})
    return groups


def make_optimizer(model: SubnetModel, cfg: FineTuneConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser over `param_groups` and its per-step warm-up + cosine scheduler."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    factor: Callable[[int], float] = lambda step: lr_factor(step, total_steps, cfg)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_tensors(images: np.ndarray, labels: np.ndarray, spec: InputSpec,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, normalised (evaluation transform) inputs and int64 labels."""
    if labels is None:
        raise FineTuneError("labels are required")
    if len(images) != len(labels):
        raise FineTuneError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FineTuneError(f"labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    x = torch.from_numpy(normalize_batch(images, spec))
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def set_trainable(model: SubnetModel, mode: str, bn: str = "train") -> list[nn.Parameter]:
    """Put the model in training mode for `mode`; return the parameters to optimise.

    With bn="frozen" every BatchNorm layer stays in eval mode (pre-trained running statistics
    are used and kept; its scale and shift still train in full mode).
    """
    if model.head is None:
        raise FineTuneError("fine-tuning needs a model with a classification head")
    model.train()
    if mode == "linear":
        model.backbone.eval()  # frozen features keep their BatchNorm statistics too
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return list(model.head.parameters())
    if bn == "frozen":
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return list(model.parameters())


@torch.no_grad()
def _features(backbone: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    was = backbone.training
    backbone.eval()
    try:
        return torch.cat([backbone(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
                         ).double().numpy()
    finally:
        backbone.train(was)


@torch.no_grad()
def probe_init_head(model: SubnetModel, x: torch.Tensor, y: torch.Tensor, seed: int = 0,
                    c: float = 1.0) -> bool:
    """Set the head to the linear probe (standardised logistic regression) on frozen features.

    The scaler is folded into the linear layer, so the model's logits equal the probe's. A
    class with no training image gets zero weights and a low bias. False (head untouched) when
    fewer than two classes are present.
    """
    # sklearn (and the scipy it pulls in) is imported here, not at the top: a SuperNode
    # starts a fresh ClientApp process for every message, and the import was ~1.5 s of
    # its ~4.5 s start-up although only probe-init uses it
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    assert model.head is not None
    labels = y.numpy()
    classes = np.unique(labels)
    if len(classes) < 2:
        log.warning("probe init skipped: the training split has a single class")
        return False
    feats = _features(model.backbone, x)
    scaler = StandardScaler().fit(feats)
    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    with threadpool_limits(limits=1):  # tiny BLAS problems: one thread is far faster
        probe.fit(scaler.transform(feats), labels)
    coef = probe.coef_ / scaler.scale_[None, :]
    bias = probe.intercept_ - coef @ scaler.mean_
    if len(classes) == 2:  # sklearn keeps one row: logit(class 1) - logit(class 0)
        coef, bias = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    weight = np.zeros((model.head.out_features, feats.shape[1]))
    full_bias = np.full(model.head.out_features, bias.min() - 10.0)
    weight[classes], full_bias[classes] = coef, bias
    model.head.weight.copy_(torch.from_numpy(weight))
    model.head.bias.copy_(torch.from_numpy(full_bias))
    return True


def label_prior_adjustment(labels: torch.Tensor, num_classes: int, tau: float
                           ) -> torch.Tensor | None:
    """tau * log(prior) of the training labels, added to the logits during training only.

    Logit adjustment (Menon et al. 2021; for label-skewed federated nodes, FedLC, Zhang et al.
    2022): a node that holds few classes would otherwise learn mostly to push the logits of
    its absent classes down, and the averaged head inherits that bias from every node. With
    the prior added, a locally rare class needs no push-down to be unlikely; at inference the
    plain logits are used. On balanced data the adjustment is a constant and changes nothing.
    """
    if tau <= 0 or num_classes < 2:
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    prior = (counts + 1e-3) / (counts.sum() + 1e-3 * num_classes)
    return (tau * prior.log()).float()


def fine_tune(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
              cfg: FineTuneConfig, progress: str | None = None) -> TrainResult:
    """Fine-tune `model` (backbone + linear head) in place with the recipe `cfg`."""
    if len(images) == 0:
        raise FineTuneError("no training images")
    if model.head is None:
        raise FineTuneError("fine-tuning needs a model with a classification head")
    x, y = to_tensors(images, labels, spec, model.num_classes or 0)
    anchors = ({name: p.detach().clone() for name, p in model.named_parameters()}
               if cfg.proximal_mu > 0 else None)  # the weights received, before any change
    if cfg.probe_init:
        probe_init_head(model, x, y, seed=cfg.seed)
    set_trainable(model, cfg.mode, cfg.bn)
    bn_trains = cfg.mode == "full" and cfg.bn == "train"
    n, bs = len(y), cfg.batch_size
    per_epoch = n // bs + (1 if n % bs >= (2 if bn_trains else 1) else 0)
    total_steps = cfg.epochs * per_epoch
    opt, sched = make_optimizer(model, cfg, max(total_steps, 1))
    prox = ([(p, anchors[name]) for name, p in model.named_parameters() if p.requires_grad]
            if anchors is not None else [])
    gen = torch.Generator().manual_seed(cfg.seed)
    adjust = label_prior_adjustment(y, model.num_classes or 0, cfg.logit_adjust)
    total, seen, steps = 0.0, 0, 0
    bar = tqdm(total=total_steps, desc=progress or "fine-tune", disable=None, leave=False)
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                if len(idx) < 2 and bn_trains:
                    continue  # BatchNorm cannot train on a batch of one
                xb = x[idx]
                if cfg.augment:
                    xb = light_augment(xb, gen, flip=cfg.flip)
                logits = model(xb)
                if adjust is not None:
                    logits = logits + adjust
                loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
                if prox:
                    loss = loss + 0.5 * cfg.proximal_mu * sum(((p - a) ** 2).sum()
                                                              for p, a in prox)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                steps += 1
                bar.update(1)
    finally:
        bar.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return TrainResult(total / max(seen, 1), n, steps)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
             batch_size: int = 256) -> EvalResult:
    """Cross-entropy and accuracy of the model on held-out images (eval mode)."""
    if len(images) == 0:
        raise FineTuneError("no evaluation images")
    x, y = to_tensors(images, labels, spec, model.num_classes or 0)
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return EvalResult(loss / len(y), correct / len(y), len(y))


# -- what a node, the in-process benchmark, the central baseline and the paper-claim bench run:
# the same two calls, so federated and central numbers differ only in how data is split.
def train_local(model: SubnetModel, images: np.ndarray, labels: np.ndarray, spec: InputSpec,
                cfg: FineTuneConfig, progress: str | None = None) -> TrainResult:
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
