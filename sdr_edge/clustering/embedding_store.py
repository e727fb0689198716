"""The teacher's embeddings of the whole pool as a float16 memory map on disk.

Why a memory map: 1.28 M x 2048 float32 embeddings are 10.5 GB per process in RAM; as float16
on disk they are N x D x 2 bytes (5.2 GB), written row by row by every rank and read chunk by
chunk by the clustering, so no process holds them all. The file is a NumPy `.npy` (its header
records shape and dtype; `np.load(..., mmap_mode="r")` reads it without unpickling anything).

Under torchrun on one node the ranks share the run dir's file system, so each rank writes its
own rows into the same file. Across nodes the run dir must be on a shared file system (NFS,
Lustre ...) that every node mounts at the same path, as the marker files of
`sdr_edge.training.distributed.run_on_main` also need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.clustering.residual_kmeans import ClusteringError

DTYPE = np.float16


def embeddings_bytes(n: int, dim: int) -> int:
    """Disk size of the memory map: N x D x 2 bytes (the .npy header adds at most a few kB)."""
    return int(n) * int(dim) * np.dtype(DTYPE).itemsize


def create(path: str | Path, n: int, dim: int) -> np.memmap:
    """Make (or overwrite) the file at its full size, filled with NaN so an unwritten row shows.

    Called by one process (rank 0) before the others open it with `open_rows`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=(int(n), int(dim)))
    for start in range(0, len(mm), 65536):
        mm[start:start + 65536] = np.nan
    mm.flush()
    return mm


def open_rows(path: str | Path, mode: str = "r+") -> np.memmap:
    """The memory map for writing ('r+') or reading ('r'); checks dtype and rank."""
    path = Path(path)
    try:
        mm = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ClusteringError(f"{path}: not a readable embeddings file ({exc})") from None
    if mm.dtype != DTYPE or mm.ndim != 2:
        raise ClusteringError(f"{path}: expected a 2-D {np.dtype(DTYPE).name} array, got "
                              f"{mm.dtype} {mm.shape}")
    return mm


def write_rows(mm: np.memmap, rows: np.ndarray, values: np.ndarray) -> None:
    """mm[rows] = values (float32 rounded to float16), for one batch of this rank's rows."""
    mm[np.asarray(rows, dtype=np.int64)] = np.asarray(values, dtype=np.float32).astype(DTYPE)
