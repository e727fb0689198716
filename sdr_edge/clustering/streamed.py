"""Residual k-means at pool scale: fit on a sample of rows, assign every row chunk by chunk.

`fit_residual_kmeans` holds its input and one residual copy in float32 RAM, 2 x N x D x 4
bytes: 21 GB for 1.28 M x 2048 ImageNet embeddings. Here the embeddings stay where they are
(usually the float16 memory map of `embedding_store`); only the fitted sample is float32 in
RAM (sample x D x 4 bytes), and the assignment reads `chunk_rows` rows at a time, so peak
memory is bounded by the sample and the chunk, not by N.

With no sample (or a sample >= the rows the fit may use) and N within one chunk, the codes are
those of today's path, `fit_residual_kmeans(x[rows])` then `assign_codes(x, codebooks)`
(tests/lib/clustering/test_scale_clustering.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdr_edge.clustering.residual_kmeans import (
    ClusteringError,
    ResidualKMeansResult,
    assign_codes,
    fit_residual_kmeans,
    l2_normalize,
)
from sdr_edge.clustering.tree_kmeans import (
    assign_tree_codes,
    fit_tree_kmeans,
    tree_branching,
    tree_nodes,
    tree_sizes,
)

CHUNK_ROWS = 65536  # rows per assignment chunk: float32 working memory ~ 2 x CHUNK x D x 4 bytes


@dataclass
class StreamedCodes:
    """Codes of every row, the fit on the sample, and the mean squared residual over all rows."""

    codes: np.ndarray  # int64 (N, R)
    fit: ResidualKMeansResult  # codebooks, and codes/sizes of the fitted sample rows
    fit_rows: np.ndarray  # which rows the centroids were fitted on (sorted)
    sizes: list[list[int]]  # per-level cluster (tree: node) sizes over `size_rows` (default all)
    residual: float  # mean over all rows of |x - sum_r c_r[code_r]|^2 (x L2-normalised)


def sample_rows(rows: np.ndarray, sample: int | None, seed: int) -> np.ndarray:
    """A sorted, seeded subset of `rows` of at most `sample` entries (all of them when None)."""
    rows = np.asarray(rows, dtype=np.int64)
    if sample is None or sample >= len(rows):
        return np.sort(rows)
    pick = np.random.default_rng([seed, 11]).choice(len(rows), size=sample, replace=False)
    return np.sort(rows[pick])


def _assign_chunk(block: np.ndarray, books: Sequence[np.ndarray], tree: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Codes of one chunk and its per-row squared residual after the last level."""
    codes = (assign_tree_codes if tree else assign_codes)(block, books)
    rows = tree_nodes(codes, tree_branching(books)) if tree else codes
    residual = l2_normalize(block)
    for r, c in enumerate(books):
        residual -= c[rows[:, r]]
    return codes, np.einsum("nd,nd->n", residual, residual)


def fit_sample_assign_chunks(embeddings: np.ndarray, branching: Sequence[int], *,
                             rows: np.ndarray | None = None, sample: int | None = None,
                             iters: int = 25, seed: int = 0, backend: str = "auto",
                             chunk_rows: int = CHUNK_ROWS,
                             size_rows: np.ndarray | None = None,
                             tree: bool = False) -> StreamedCodes:
    """Fit residual k-means on at most `sample` of `rows` (default all rows), then assign every
    row of `embeddings` (N x D, any float dtype, e.g. a float16 np.memmap) in chunks.
    `tree` fits hierarchical k-means instead (`tree_kmeans`; the same local-digit codes).

    The fitted rows' codes in the result are the assignment's, which equal the fit's own codes
    (`fit_residual_kmeans` uses the same arithmetic as `assign_codes`). `size_rows` picks the
    rows the reported cluster sizes count (e.g. the training rows); default all rows.
    """
    if embeddings.ndim != 2:
        raise ClusteringError(f"embeddings must be a 2-D array [N, D], got shape {embeddings.shape}")
    if chunk_rows < 1:
        raise ClusteringError(f"chunk_rows must be at least 1, got {chunk_rows}")
    n = len(embeddings)
    fit_rows = sample_rows(np.arange(n) if rows is None else rows, sample, seed)
    if len(fit_rows) and (fit_rows[0] < 0 or fit_rows[-1] >= n):
        raise ClusteringError(f"rows must index the {n} embeddings")
    x_fit = np.asarray(embeddings[fit_rows], dtype=np.float32)  # the only N-independent copy
    fit = (fit_tree_kmeans if tree else fit_residual_kmeans)(x_fit, branching, iters=iters,
                                                              seed=seed, backend=backend)
    del x_fit
    codes = np.empty((n, len(fit.codebooks)), dtype=np.int64)
    energy = 0.0
    for start in range(0, n, chunk_rows):
        block = np.asarray(embeddings[start:start + chunk_rows], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ClusteringError(f"embeddings rows {start}..{start + len(block) - 1} contain "
                                  "NaN or infinite values")
        codes[start:start + len(block)], sq = _assign_chunk(block, fit.codebooks, tree)
        energy += float(sq.sum(dtype=np.float64))
    counted = codes if size_rows is None else codes[np.asarray(size_rows, dtype=np.int64)]
    if tree:  # images per tree node, not per local digit
        counted, cells = tree_nodes(counted, branching), tree_sizes(branching)
    else:
        cells = [int(k) for k in branching]
    sizes = [np.bincount(counted[:, r], minlength=k).tolist() for r, k in enumerate(cells)]
    return StreamedCodes(codes=codes, fit=fit, fit_rows=fit_rows, sizes=sizes,
                         residual=energy / max(n, 1))
