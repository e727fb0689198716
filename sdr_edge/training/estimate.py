"""Host memory and disk a training run needs, computed from its config and the code's buffers.

Why computed, not measured: nothing here can run ImageNet, so configs/imagenet.toml's comment
numbers come from these formulas (tests/lib/clustering/test_scale_estimate.py checks that the
comment is exactly `comment_block` of this estimate). Each term names the buffer it counts:

    pool index      FolderPool: file names (one fixed-width bytes array) + int64 labels
    loader batches  uint8 batches at the decode size in flight: `workers x prefetch` queued,
                    one in use, one pinned copy when pin_memory (sdr_edge.data.pool)
    eval temporaries  float32 NCHW batch of the evaluation transform and its two temporaries
                    (normalize_batch: astype, subtract/divide, transpose copy)
    codes           int64 N x R, held by every rank during the level phases
    embeddings      float16 N x D memory map on disk (sdr_edge.clustering.embedding_store)
    clustering      rank 0: the fitted sample as float32 up to 4 times (input, residual,
                    scikit-learn's centred copy, a split cluster's members) + 3 float32 chunks
                    (sdr_edge.clustering.streamed) + the codes
    kit             rank 0: its loader batches + eval temporaries at the kit batch size
    shards          per sample: the file + tar header (512 B) + padding (256 B mean) + the
                    `.cls` member (1 KiB); per shard 10 KiB of tar end blocks; index.npy 32 B

Not counted: the Python/torch/CUDA runtime of each process and DataLoader worker (a few
hundred MB each, mostly shared pages), and GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdr_edge.clustering.streamed import CHUNK_ROWS
from sdr_edge.routing.kit import DEFAULT_BATCH as KIT_BATCH
from sdr_edge.training.config import TrainConfig
from sdr_edge.training.pipeline import EMBED_BATCH

TAR_SAMPLE_OVERHEAD = 512 + 256 + 1024
TAR_SHARD_OVERHEAD = 10240


@dataclass(frozen=True)
class ResourceEstimate:
    """Bytes per item (see the module docstring for what each counts)."""

    images: int
    world_size: int
    feature_dim: int
    fit_rows: int
    pool_index: int
    train_batches: int
    embed_batches: int
    codes: int
    embeddings_disk: int
    clustering_rank0: int
    kit_rank0: int
    shards_disk: int
    old_pool_per_rank: int  # what every rank held before streaming: the decoded uint8 pool
    old_kit_float: int  # what the kit converted on one device before: the pool as float32

    @property
    def per_rank(self) -> int:
        """Peak host RAM of a rank other than 0 (the phases run one after the other)."""
        return self.pool_index + self.codes + max(self.train_batches, self.embed_batches)

    @property
    def rank0(self) -> int:
        return self.pool_index + self.codes + max(self.train_batches, self.embed_batches,
                                                  self.clustering_rank0, self.kit_rank0)


def _batches(batch: int, pixels: int, workers: int, prefetch: int, pinned: bool) -> int:
    return (workers * prefetch + 1 + int(pinned)) * batch * pixels


def estimate(cfg: TrainConfig, images: int, world_size: int, *, mean_file_bytes: int = 110_000,
             path_bytes: int = 32, shard_size: int = 1000, labelled: bool = True
             ) -> ResourceEstimate:
    """The estimate for `images` files (before `[data] limit`) on `world_size` ranks.

    `mean_file_bytes` (ImageNet train: ~140 GB / 1.28 M JPEGs) and `path_bytes` (the longest
    relative file name) describe the folder; `shard_size` is `sdr-server shards --shard-size`.
    """
    d = cfg.data
    n = min(images, d.limit) if d.limit else images
    size, channels = d.image_size, d.channels
    decoded = (d.decode_size or size) ** 2 * channels  # uint8 bytes of one decoded image
    eval_float = size * size * channels * 4
    dim = cfg.backbone_config().feature_dim
    levels = len(cfg.routing.branching)
    n_train = n - (max(1, round(n * d.val_fraction)) if d.val_fraction > 0 and n >= 10 else 0)
    fit_rows = min(cfg.cluster.sample or n_train, n_train)
    per_rank_batch = min(cfg.ssl.batch_size, n_train) // world_size
    codes = n * levels * 8
    shards = -(-n // shard_size)
    return ResourceEstimate(
        images=n, world_size=world_size, feature_dim=dim, fit_rows=fit_rows,
        pool_index=n * (path_bytes + 8),
        train_batches=_batches(per_rank_batch, decoded, d.workers, d.prefetch, d.pin_memory),
        embed_batches=_batches(EMBED_BATCH, decoded, d.workers, d.prefetch, d.pin_memory)
        + 3 * EMBED_BATCH * eval_float,
        codes=codes,
        embeddings_disk=n * dim * 2,
        clustering_rank0=4 * fit_rows * dim * 4 + 3 * min(CHUNK_ROWS, n) * dim * 4 + codes,
        kit_rank0=_batches(KIT_BATCH, decoded, d.workers, d.prefetch, d.pin_memory)
        + 3 * KIT_BATCH * eval_float,
        shards_disk=n * (mean_file_bytes + TAR_SAMPLE_OVERHEAD - (0 if labelled else 1024))
        + shards * TAR_SHARD_OVERHEAD + n * 32,
        old_pool_per_rank=n * size * size * channels,
        old_kit_float=n * eval_float,
    )


def _gb(b: int) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


def comment_block(e: ResourceEstimate) -> str:
    """The memory/disk comment lines of a config, as `# ...` lines."""
    lines = [
        f"Memory and disk for {e.images:,} images on {e.world_size} ranks, computed by",
        "sdr_edge.training.estimate from this config (GB = 1e9 bytes; runtimes not counted):",
        f"  per rank RAM   {_gb(e.per_rank)}: file names + labels {_gb(e.pool_index)}, codes "
        f"{_gb(e.codes)},",
        f"                 loader batches in flight {_gb(e.train_batches)} (training) or "
        f"{_gb(e.embed_batches)} (embeddings)",
        f"  rank 0 RAM     {_gb(e.rank0)}: k-means on {e.fit_rows:,} x {e.feature_dim} "
        f"{_gb(e.clustering_rank0)}, kit {_gb(e.kit_rank0)}",
        f"  disk           embeddings memory map N x D x 2 B = {_gb(e.embeddings_disk)} "
        "(RUN/work, removed after clustering);",
        f"                 shards ~{_gb(e.shards_disk)} (the folder's JPEGs + tar overhead)",
        f"  before streaming: {_gb(e.old_pool_per_rank)} of decoded pixels per rank, and the "
        f"kit's {_gb(e.old_kit_float)} float32 copy",
    ]
    return "\n".join(f"# {line}".rstrip() for line in lines)
