"""One training epoch, embeddings with the evaluation transform, and the kNN monitor.

Every phase reads images through an `ImagePool` by indices: each step asks the pool (directly,
or through DataLoader workers that decode ahead) for its uint8 batch only, moves it to the device
and augments it there (two random views). Every random choice of an epoch comes from seeds
derived from (run seed, phase, epoch, rank), and the pool returns the same pixels for the same
indices: a resumed run replays the same epochs as an uninterrupted one, whatever the source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sdr_edge.data.augment import AugmentConfig, augment_batch, normalize_tensor
from sdr_edge.data.pool import ImagePool, iter_batches
from sdr_edge.data.preprocess import InputSpec, normalize_pool_batch
from sdr_edge.ssl.knn import knn_accuracy
from sdr_edge.ssl.losses import siamkd_loss, simsiam_loss
from sdr_edge.training.distributed import DistEnv, rank_batches
from sdr_edge.training.siamese import FrozenTeacher, output_std, set_cosine_lr


def epoch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, phase id, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclass
class EpochPlan:
    """What one epoch trains on: the image pool, which indices, and how to batch them.

    `workers` > 0 decodes batches in that many DataLoader worker processes, ahead of the step;
    `pin_memory` pins them for asynchronous host-to-GPU copies (CUDA only)."""

    pool: ImagePool  # uint8 images by index (in memory, a folder or shards)
    train_index: np.ndarray  # indices of the pool that training may use
    spec: InputSpec
    global_batch: int
    seed: int
    phase_id: int
    augment: AugmentConfig = AugmentConfig()
    workers: int = 0
    pin_memory: bool = False
    prefetch: int = 2


def to_device_unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x C (CPU, maybe pinned) -> N x C x H x W floats in [0, 1] on `device`."""
    x = batch.to(device, non_blocking=batch.is_pinned())
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def make_views(plan: EpochPlan, batch: torch.Tensor, g: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented, normalised views of a uint8 NHWC batch on `device`, at
    the spec's size (a pool may decode larger than the training size)."""
    x = to_device_unit(batch, device)
    size = plan.spec.image_size
    views = []
    for _ in range(2):
        v = augment_batch(x, plan.augment, g)
        if v.shape[-1] != size or v.shape[-2] != size:
            v = torch.nn.functional.interpolate(v, size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)
        views.append(normalize_tensor(v, plan.spec.mean, plan.spec.std))
    return views[0], views[1]


def rank_order(plan: EpochPlan, epoch: int, env: DistEnv) -> tuple[np.ndarray, int, int]:
    """This rank's indices for the epoch, concatenated batch after batch, the per-rank batch
    size and the step count: the seeded permutation of (seed, phase, epoch) cut as
    `rank_batches` cuts it, so every rank runs the same steps on disjoint images."""
    rng = np.random.default_rng(epoch_seed(plan.seed, plan.phase_id, epoch))
    perm = plan.train_index[rng.permutation(len(plan.train_index))]
    batches = rank_batches(perm, plan.global_batch, env)
    per_rank = plan.global_batch // env.world_size
    mine = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    return mine, per_rank, len(batches)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, plan: EpochPlan, epoch: int,
                num_epochs: int, base_lr: float, env: DistEnv, *, codes: torch.Tensor | None = None,
                teacher: FrozenTeacher | None = None, kd_weight: float = 0.0,
                amp: bool = False, desc: str = "", channels_last: bool = False,
                on_step: Callable[[int, int, int, float, float], None] | None = None
                ) -> dict[str, float]:
    """One pass of SimSiam (or SiamKD when a teacher is given) over the plan's images.

    `model` is a SiameseNet, possibly DDP-wrapped; `codes` (N x R, indexed like `images`)
    routes an SDRnet encoder. `amp` enables bfloat16 autocast (CUDA only), `channels_last`
    feeds NHWC views, `on_step(epoch, step, steps, loss, lr)` sees every step (live tracking);
    `collapse_std` is SimSiam's collapse monitor of the projector outputs. Returns the
    rank-averaged mean loss, the epoch's throughput and `data_wait`, the fraction of this
    rank's epoch time spent waiting for the pool's next batch.
    """
    autocast = amp and env.device.type == "cuda"
    mine, per_rank, num_steps = rank_order(plan, epoch, env)
    loader = iter_batches(plan.pool, mine, per_rank, workers=plan.workers,
                          pin_memory=plan.pin_memory and env.device.type == "cuda",
                          prefetch=plan.prefetch)
    g = torch.Generator(device=env.device)
    g.manual_seed(epoch_seed(plan.seed, plan.phase_id, epoch, env.rank))
    model.train()
    total, count, seen, wait = 0.0, 0, 0, 0.0
    collapse = torch.zeros((), device=env.device)
    start = time.perf_counter()
    bar = tqdm(total=num_steps, desc=desc, disable=not env.is_main, leave=False, unit="batch",
               dynamic_ncols=True)
    for step in range(num_steps):
        t_wait = time.perf_counter()
        idx, batch = next(loader)
        wait += time.perf_counter() - t_wait
        lr = set_cosine_lr(opt, base_lr, epoch * num_steps + step, num_epochs * num_steps)
        x1, x2 = make_views(plan, batch, g, env.device)
        if channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        batch_codes = None if codes is None else codes[torch.from_numpy(idx)].to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            p1, p2, z1, z2 = model(x1, x2, batch_codes)
            if teacher is None:
                loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
            else:
                t1, t2 = teacher(x1).float(), teacher(x2).float()
                loss = siamkd_loss(p1.float(), p2.float(), z1.float(), z2.float(), t1, t2,
                                   kd_weight)
        collapse = collapse + output_std(z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower [ssl] lr")
        if on_step is not None:
            on_step(epoch, step, num_steps, value, lr)
        total += value
        count += 1
        seen += len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    loader.close()  # ends DataLoader workers now, not at garbage collection
    elapsed = time.perf_counter() - start
    return {"loss": env.all_reduce_mean(total / max(count, 1)),
            "collapse_std": env.all_reduce_mean(float(collapse) / max(count, 1)),
            "images_per_s": seen * env.world_size / max(elapsed, 1e-9), "steps": count,
            "data_wait": wait / max(elapsed, 1e-9)}


@torch.no_grad()
def iter_features(encode: Callable[[torch.Tensor, np.ndarray], torch.Tensor], pool: ImagePool,
                  index: np.ndarray, spec: InputSpec, device: torch.device, batch: int = 512,
                  workers: int = 0):
    """(indices, float32 CPU features) batch after batch: nothing beyond one batch of images is
    held, so a caller can write features out (e.g. to a memory-mapped array) as they come."""
    for idx, images in iter_batches(pool, index, batch, workers=workers):
        x = torch.from_numpy(normalize_pool_batch(images.numpy(), spec)).to(device)
        yield idx, encode(x, idx).float().cpu()


@torch.no_grad()
def embed(encode: Callable[[torch.Tensor, np.ndarray], torch.Tensor], pool: ImagePool,
          index: np.ndarray, spec: InputSpec, device: torch.device, batch: int = 512,
          workers: int = 0) -> torch.Tensor:
    """Features of pool[index] with the evaluation transform; `encode(x, idx)` runs the model."""
    out = [f for _, f in iter_features(encode, pool, index, spec, device, batch, workers)]
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def knn_monitor(encode: Callable[[torch.Tensor, np.ndarray], torch.Tensor], pool: ImagePool,
                train_index: np.ndarray, val_index: np.ndarray, spec: InputSpec,
                device: torch.device, max_bank: int, seed: int, workers: int = 0) -> float | None:
    """kNN accuracy of held-out images against (a seeded subset of) the training images."""
    labels = pool.labels
    if labels is None or len(val_index) == 0:
        return None
    bank = train_index
    if len(bank) > max_bank:
        bank = np.sort(np.random.default_rng(seed).choice(bank, max_bank, replace=False))
    queries = val_index[:max_bank]
    train_feats = embed(encode, pool, bank, spec, device, workers=workers)
    val_feats = embed(encode, pool, queries, spec, device, workers=workers)
    return knn_accuracy(train_feats, torch.from_numpy(labels[bank]), val_feats,
                        torch.from_numpy(labels[queries]), num_classes=int(labels.max()) + 1)
