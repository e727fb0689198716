"""One image-pool interface that every training phase reads through.

Epochs, clustering embeddings, the signature kit and the kNN monitor ask a pool for a uint8
batch by indices, never for the whole data set: an in-memory pool (built-in sources,
Fashion-MNIST) answers with a view of its array, a folder or shard pool decodes only the
indices it is asked for. Indexed reads (not a sequential stream) are what keep a resumed run
exact: the epoch's sample order is a seeded permutation of indices, replayed identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ImagePool(Protocol):
    """What every training phase reads images through (epochs, clustering embeddings, kit,
    kNN monitor)."""

    name: str
    size: int  # decode size in pixels (square), may exceed the training size
    channels: int  # 1 or 3
    labels: np.ndarray | None  # int64 (N,) or None, available without decoding
    label_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, channels), in the order given."""
        ...


@dataclass
class MemoryPool:
    """A pool over an N x H x W x C uint8 array already in memory (zero-copy wrap of an
    `ImageSource`'s arrays); `skipped` lists files its loader could not decode."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be N x H x W x C uint8, got "
                             f"{self.images.dtype} {self.images.shape}")
        if self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"{self.name}: images must be square, got {self.images.shape[1:3]}")

    @classmethod
    def from_source(cls, source) -> MemoryPool:  # an sdr_edge.data.sources.ImageSource
        return cls(source.name, source.images, source.labels, tuple(source.label_names),
                   list(source.skipped))

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]


class _BatchDataset(torch.utils.data.Dataset):
    """Item i is batch i (indices and uint8 images): a DataLoader worker decodes whole batches,
    so each worker process reads only the batches it is handed, in order."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, batch_size: int) -> None:
        self.pool, self.indices, self.batch_size = pool, indices, batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        idx = self.indices[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.pool.read(idx)
        bad = list(getattr(self.pool, "last_unreadable", ()))  # a worker's decode failures
        return idx, torch.from_numpy(np.ascontiguousarray(images)), bad


def _collate_none(item):  # batch_size=None: the dataset already returns whole batches
    return item


def iter_batches(pool: ImagePool, indices: np.ndarray, batch_size: int, *, workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2
                 ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices of the batch, uint8 tensor (n, size, size, C)) in order; with workers > 0
    through a torch.utils.data.DataLoader with worker processes (each worker decodes its
    batches, `prefetch` batches ahead). Decode failures seen in workers are added to the
    pool's `skipped` list here, in the main process."""
    indices = np.asarray(indices, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = _BatchDataset(pool, indices, batch_size)
    if workers <= 0:
        for i in range(len(data)):
            idx, images, _ = data[i]
            yield idx, (images.pin_memory() if pin_memory else images)
        return
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch, persistent_workers=False, collate_fn=_collate_none)
    skipped = getattr(pool, "skipped", None)
    for idx, images, bad in loader:
        if bad and isinstance(skipped, list):
            skipped.extend(p for p in bad if p not in skipped)
        yield np.asarray(idx), images


def channel_stats(pool: ImagePool, indices: np.ndarray, max_images: int = 20000, seed: int = 0,
                  batch_size: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over pool[indices] (a seeded sample of
    `max_images` of them when there are more), for the normalisation in the input spec.

    Sums of uint8 values and their squares are exact in int64, so the result does not depend
    on how the images are batched."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) > max_images:
        indices = np.sort(np.random.default_rng([seed, 11]).choice(indices, max_images,
                                                                   replace=False))
    if len(indices) == 0:
        raise ValueError(f"{pool.name}: no images to compute channel statistics from")
    total = np.zeros(pool.channels, dtype=np.int64)
    squares = np.zeros(pool.channels, dtype=np.int64)
    count = 0
    for _, batch in iter_batches(pool, indices, batch_size):
        x = batch.numpy().reshape(-1, pool.channels).astype(np.int64)
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
        count += x.shape[0]
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    std = np.maximum(np.sqrt(var) / 255.0, 1e-3)
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std)


def rank_share(n: int, rank: int, world_size: int) -> np.ndarray:
    """The indices rank `rank` of `world_size` handles in a pass over all n images (strided,
    disjoint, together all of them): used for embeddings so each rank decodes only its share."""
    return np.arange(rank, n, world_size, dtype=np.int64)


SHARDS_PREFIX = "shards:"


def open_pool(data, seed: int = 0) -> ImagePool:
    """The pool a `[data]` table names (duck-typed: source, image_size, channels, limit and
    optionally decode_size): `shards:DIR` -> ShardPool, an existing folder -> FolderPool
    (streamed), anything else -> MemoryPool over `load_source` (built-in specs, Fashion-MNIST,
    glyphs, mixes, class filters). `limit` keeps the same seeded subset in every case, chosen
    from the file list before any decode."""
    from pathlib import Path

    size = int(getattr(data, "decode_size", None) or data.image_size)
    source, channels, limit = str(data.source), int(data.channels), data.limit
    if source.startswith(SHARDS_PREFIX):
        from sdr_edge.data.shards import ShardPool

        return ShardPool(source[len(SHARDS_PREFIX):], size, channels, limit=limit, seed=seed)
    if Path(source).is_dir():
        from sdr_edge.data.folder import FolderPool

        return FolderPool(source, size, channels, limit=limit, seed=seed)
    from sdr_edge.data.sources import load_source

    return MemoryPool.from_source(load_source(source, size, channels, limit, seed))


def subset_index(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The seeded subset `[data] limit` keeps of n items (sorted; all of them without a limit):
    the same rule as `load_source`, so a folder streamed or loaded keeps the same images."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)).astype(np.int64)
