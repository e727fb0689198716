"""One training epoch, embeddings with the evaluation transform, and the kNN monitor.

Images stay uint8 NHWC in memory; each step moves only its batch to the device and augments it
there (two random views), so no DataLoader workers are needed. Every random choice of an epoch
comes from seeds derived from (run seed, phase, epoch, rank): a resumed run replays the same
epochs as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sdr_edge.data.augment import AugmentConfig, augment_batch, normalize_tensor, to_unit_tensor
from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.ssl.knn import knn_accuracy
from sdr_edge.ssl.losses import siamkd_loss, simsiam_loss
from sdr_edge.training.distributed import DistEnv, rank_batches
from sdr_edge.training.siamese import FrozenTeacher, set_cosine_lr


def epoch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, phase id, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclass
class EpochPlan:
    """What one epoch trains on: the image pool, which indices, and how to batch them."""

    images: np.ndarray  # N x H x W x C uint8 (the whole source)
    train_index: np.ndarray  # indices of `images` that training may use
    spec: InputSpec
    global_batch: int
    seed: int
    phase_id: int
    augment: AugmentConfig = AugmentConfig()


def make_views(plan: EpochPlan, idx: np.ndarray, g: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented, normalised views of images[idx] on `device`."""
    x = to_unit_tensor(plan.images[idx], device)
    v1 = normalize_tensor(augment_batch(x, plan.augment, g), plan.spec.mean, plan.spec.std)
    v2 = normalize_tensor(augment_batch(x, plan.augment, g), plan.spec.mean, plan.spec.std)
    return v1, v2


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, plan: EpochPlan, epoch: int,
                num_epochs: int, base_lr: float, env: DistEnv, *, codes: torch.Tensor | None = None,
                teacher: FrozenTeacher | None = None, kd_weight: float = 0.0,
                amp: bool = False, desc: str = "") -> dict[str, float]:
    """One pass of SimSiam (or SiamKD when a teacher is given) over the plan's images.

    `model` is a SiameseNet, possibly DDP-wrapped; `codes` (N x R, indexed like `images`)
    routes an SDRnet encoder. `amp` enables bfloat16 autocast (CUDA only). Returns the
    rank-averaged mean loss and the epoch's throughput.
    """
    autocast = amp and env.device.type == "cuda"
    rng = np.random.default_rng(epoch_seed(plan.seed, plan.phase_id, epoch))
    perm = plan.train_index[rng.permutation(len(plan.train_index))]
    batches = rank_batches(perm, plan.global_batch, env)
    g = torch.Generator(device=env.device)
    g.manual_seed(epoch_seed(plan.seed, plan.phase_id, epoch, env.rank))
    model.train()
    total, count, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, disable=not env.is_main, leave=False, unit="batch",
               dynamic_ncols=True)
    for step, idx in enumerate(bar):
        set_cosine_lr(opt, base_lr, epoch * len(batches) + step, num_epochs * len(batches))
        x1, x2 = make_views(plan, idx, g, env.device)
        batch_codes = None if codes is None else codes[torch.from_numpy(idx)].to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            p1, p2, z1, z2 = model(x1, x2, batch_codes)
            if teacher is None:
                loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
            else:
                t1, t2 = teacher(x1).float(), teacher(x2).float()
                loss = siamkd_loss(p1.float(), p2.float(), z1.float(), z2.float(), t1, t2,
                                   kd_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower [ssl] lr")
        total += value
        count += 1
        seen += len(idx)
        bar.set_postfix(loss=f"{total / count:.4f}")
    elapsed = time.perf_counter() - start
    return {"loss": env.all_reduce_mean(total / max(count, 1)),
            "images_per_s": seen * env.world_size / max(elapsed, 1e-9), "steps": count}


@torch.no_grad()
def embed(encode: Callable[[torch.Tensor, np.ndarray], torch.Tensor], images: np.ndarray,
          index: np.ndarray, spec: InputSpec, device: torch.device, batch: int = 512) -> torch.Tensor:
    """Features of images[index] with the evaluation transform; `encode(x, idx)` runs the model."""
    out = []
    for start in range(0, len(index), batch):
        idx = index[start:start + batch]
        x = torch.from_numpy(normalize_batch(images[idx], spec)).to(device)
        out.append(encode(x, idx).float().cpu())
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def knn_monitor(encode: Callable[[torch.Tensor, np.ndarray], torch.Tensor], images: np.ndarray,
                labels: np.ndarray | None, train_index: np.ndarray, val_index: np.ndarray,
                spec: InputSpec, device: torch.device, max_bank: int, seed: int) -> float | None:
    """kNN accuracy of held-out images against (a seeded subset of) the training images."""
    if labels is None or len(val_index) == 0:
        return None
    bank = train_index
    if len(bank) > max_bank:
        bank = np.sort(np.random.default_rng(seed).choice(bank, max_bank, replace=False))
    queries = val_index[:max_bank]
    train_feats = embed(encode, images, bank, spec, device)
    val_feats = embed(encode, images, queries, spec, device)
    return knn_accuracy(train_feats, torch.from_numpy(labels[bank]), val_feats,
                        torch.from_numpy(labels[queries]), num_classes=int(labels.max()) + 1)
