"""Residual k-means (residual quantization) of the teacher's embeddings into routing codes.

Level 1 clusters the L2-normalised embeddings into B_1 cells; level r clusters what is left
after subtracting the chosen centroids of levels 1..r-1. Digit b_r therefore means the same
thing for every image at level r, which is what lets expert (r, b_r) specialise.

The fit computes the codes with the same arithmetic as `assign_codes`, so codes computed later
from the saved codebooks equal the codes the experts were trained on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sdr_edge.errors import SdrEdgeError

BACKENDS = ("auto", "faiss", "sklearn")
SEED_SAMPLE = 20000  # points the k-means++ seeding looks at
_CHUNK = 65536  # rows per block in the distance computation: bounds memory at ~D*4*CHUNK bytes


class ClusteringError(SdrEdgeError, ValueError):
    """The embeddings or the branching cannot be clustered as asked."""


@dataclass
class ResidualKMeansResult:
    """Per-level codebooks, every point's code and the per-level cluster sizes."""

    codebooks: list[np.ndarray]
    codes: np.ndarray
    sizes: list[list[int]]
    backend: str
    reseeded: list[int] = field(default_factory=list)
    """How many empty or near-empty clusters were re-seeded at each level after the backend's fit."""
    residual_energy: list[float] = field(default_factory=list)
    """Mean squared norm of the residual after each level (1.0 before level 1: unit vectors)."""
    iterations: list[int] = field(default_factory=list)
    """Lloyd iterations the backend ran at each level (fewer than `iters` once converged)."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-norm rows (an all-zero row stays zero rather than becoming NaN)."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    x /= norms
    return x


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid for every row and its squared distance (blocked matmul)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    c_sq = np.einsum("kd,kd->k", c, c)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        block = x[start:start + _CHUNK]
        d2 = c_sq[None, :] - 2.0 * (block @ c.T)
        best = np.argmin(d2, axis=1)
        x_sq = np.einsum("nd,nd->n", block, block)
        idx[start:start + len(block)] = best
        dist[start:start + len(block)] = np.maximum(d2[np.arange(len(block)), best] + x_sq, 0.0)
    return idx, dist


def reseed_empty_clusters(x: np.ndarray, centroids: np.ndarray,
                          max_rounds: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign `x` and move every empty cluster's centroid onto the worst-served point.

    The point farthest from its centroid (taken from a cluster that keeps at least one other
    point) becomes the empty cluster's centroid, so the cluster owns at least that point.
    Returns (centroids, codes, number of re-seeds). Raises ClusteringError when the data has
    fewer distinct points than clusters, because then some cluster must stay empty.
    """
    centroids = np.array(centroids, dtype=np.float32, copy=True)
    k = len(centroids)
    reseeds = 0
    for _ in range(max_rounds or 2 * k + 2):
        codes, dist = nearest(x, centroids)
        counts = np.bincount(codes, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty) == 0:
            return centroids, codes, reseeds
        for j in empty:
            donors = counts[codes] > 1
            score = np.where(donors, dist, -1.0)
            i = int(np.argmax(score))
            if score[i] <= 0.0:
                break  # every point already sits on a centroid: nothing left to split off
            centroids[j] = x[i]
            counts[codes[i]] -= 1
            counts[j] += 1
            codes[i] = j
            dist[i] = 0.0
            reseeds += 1
    codes, _ = nearest(x, centroids)
    counts = np.bincount(codes, minlength=k)
    if (counts == 0).any():
        distinct = len(np.unique(x, axis=0))
        raise ClusteringError(
            f"cannot fill {k} clusters: {int((counts == 0).sum())} stay empty because the "
            f"data has only {distinct} distinct point(s) at this level")
    return centroids, codes, reseeds


def cluster_means(x: np.ndarray, codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Mean of every cluster's points; an empty cluster keeps its old centroid."""
    from scipy.sparse import csr_matrix

    k = len(centroids)
    onehot = csr_matrix((np.ones(len(codes), dtype=np.float32), (codes, np.arange(len(codes)))),
                        shape=(k, len(codes)))
    sums = np.asarray(onehot @ x, dtype=np.float32)
    counts = np.bincount(codes, minlength=k)
    means = centroids.copy()
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means


def _split_cluster(x: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Two centroids one standard deviation either side of the mean along the principal axis.

    None when the members all coincide: there is nothing to split.
    """
    points = x[members]
    mean = points.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = points - mean
    axis = centred[np.argmax(np.einsum("nd,nd->n", centred, centred))].copy()
    for _ in range(10):  # power iteration from the farthest member
        axis = centred.T @ (centred @ axis)
        axis /= max(float(np.linalg.norm(axis)), 1e-12)
    spread = float(np.std(centred @ axis))
    if spread <= 1e-6:
        return None
    return mean - spread * axis, mean + spread * axis


def repair_small_clusters(x: np.ndarray, centroids: np.ndarray, min_size: int, *,
                          rounds: int = 8, refine_iters: int = 10) -> tuple[np.ndarray, int]:
    """Re-seed clusters smaller than `min_size` by splitting the largest cluster in two.

    k-means on deep residuals often parks a centroid on one or two outliers; such a cluster
    would give its expert nothing to learn from. The small cluster's centroid is moved into the
    largest cluster, which is split along its principal axis, then Lloyd iterations settle the
    partition. Best effort: returns (centroids, number of splits).
    """
    centroids = np.array(centroids, dtype=np.float32, copy=True)
    splits = 0
    for _ in range(rounds):
        codes, _ = nearest(x, centroids)
        counts = np.bincount(codes, minlength=len(centroids))
        small = int(np.argmin(counts))
        largest = int(np.argmax(counts))
        if counts[small] >= min_size or counts[largest] < 2 * min_size:
            break
        halves = _split_cluster(x, np.flatnonzero(codes == largest))
        if halves is None:
            break
        centroids[small], centroids[largest] = halves
        splits += 1
        for _ in range(refine_iters):
            codes, _ = nearest(x, centroids)
            centroids = cluster_means(x, codes, centroids)
    return centroids, splits


def seed_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding (scikit-learn's) on a bounded random sample of `x`.

    Both backends start from these seeds. faiss's own k-means++ and random seeding landed in a
    merged-blobs local minimum in 3 of 10 seeds on test_clustering.py's hierarchical data;
    greedy k-means++ (several candidates per pick) found the structure every time. Seeding on a
    sample keeps its cost independent of N.
    """
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)
    size = min(len(x), max(SEED_SAMPLE, 64 * k))
    sample = x if size == len(x) else x[np.sort(rng.choice(len(x), size=size, replace=False))]
    centres, _ = kmeans_plusplus(sample, k, random_state=seed)
    return np.ascontiguousarray(centres, dtype=np.float32)


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _fit_faiss(x: np.ndarray, init: np.ndarray, iters: int, seed: int) -> tuple[np.ndarray, int]:
    """faiss's Lloyd iterations; on one GPU when faiss has one (`faiss.Kmeans(gpu=1)` puts its
    flat index on a `StandardGpuResources` via `index_cpu_to_all_gpus`; the GPU it picks is
    device 0, which under torchrun is local rank 0's, the rank that clusters)."""
    import faiss

    k = len(init)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False, nredo=1,
                      gpu=1 if faiss_gpus() > 0 else False,
                      min_points_per_centroid=1,
                      max_points_per_centroid=math.ceil(len(x) / k) + 1)  # no hidden subsampling
    km.train(x, init_centroids=init)
    return np.asarray(km.centroids, dtype=np.float32), len(km.obj)


def _fit_sklearn(x: np.ndarray, init: np.ndarray, iters: int, seed: int) -> tuple[np.ndarray, int]:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(n_clusters=len(init), init=init, n_init=1, max_iter=iters, random_state=seed,
                algorithm="lloyd")
    with warnings.catch_warnings():  # duplicate points: reseed_empty_clusters deals with it
        warnings.simplefilter("ignore", ConvergenceWarning)
        km.fit(x)  # stops early once no point changes cluster
    return np.asarray(km.cluster_centers_, dtype=np.float32), int(km.n_iter_)


_FITTERS = {"faiss": _fit_faiss, "sklearn": _fit_sklearn}


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_backend(n: int, d: int) -> str:
    """The faster backend for `n` x `d` embeddings, from benchmarks/clustering_speed.py.

    Measured (2-core shared CPU, branching 4x4x4x4, 25 iterations, same greedy k-means++ seeds):
    one thread each, scikit-learn used 10-16 % less CPU than faiss from 20k to 200k x 512 and
    the same at 50k x 2048; with both cores, faiss took 4x longer than scikit-learn at 20k x 512
    (its OpenMP threads spin between calls when the cores are busy). So scikit-learn, except
    when its extra centred copy of the data would not fit in memory while faiss (no copy) would,
    or when faiss sees a GPU (not measured here: this machine has none).
    """
    if faiss_gpus() > 0:
        return "faiss"
    need_sklearn, need_faiss = 3 * n * d * 4, 2 * n * d * 4  # bytes: input, residual (+ copy)
    memory = _physical_memory()
    if memory is not None and need_sklearn > 0.8 * memory >= need_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "sklearn"
        return "faiss"
    return "sklearn"


def fit_level(x: np.ndarray, k: int, *, iters: int, seed: int, backend: str,
              sample: int | None = None) -> tuple[np.ndarray, int]:
    """Centroids of one level and the Lloyd iterations run: the backend's k-means from greedy
    k-means++ seeds, on at most `sample` rows of `x`."""
    if sample is not None and sample < len(x):
        rows = np.sort(np.random.default_rng(seed).choice(len(x), size=sample, replace=False))
        x = x[rows]
    if k == 1:
        return x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32), 0
    return _FITTERS[backend](x, seed_centroids(x, k, seed), iters, seed)


def _check(embeddings: np.ndarray, branching: Sequence[int]) -> None:
    if embeddings.ndim != 2:
        raise ClusteringError(f"embeddings must be a 2-D array [N, D], got shape {embeddings.shape}")
    if not branching:
        raise ClusteringError("branching must list at least one level, e.g. (4, 4, 4, 4)")
    if any(int(b) < 1 for b in branching):
        raise ClusteringError(f"every level needs at least one cluster, got branching {list(branching)}")
    if len(embeddings) < max(branching):
        raise ClusteringError(f"{len(embeddings)} embeddings cannot fill {max(branching)} clusters")
    if not np.isfinite(embeddings).all():
        raise ClusteringError("embeddings contain NaN or infinite values")


def fit_residual_kmeans(embeddings: np.ndarray, branching: Sequence[int], *, iters: int = 25,
                        seed: int = 0, backend: str = "auto",
                        sample: int | None = None,
                        min_cluster_share: float = 0.05) -> ResidualKMeansResult:
    """Residual k-means over L2-normalised `embeddings` with `branching[r]` centroids at level r.

    `sample` fits each level's centroids on at most that many points (every point is still
    assigned); None uses all of them. A cluster holding fewer than `min_cluster_share` of an
    even share (N / B_r) is re-seeded by splitting the largest one; an empty cluster always is.
    """
    embeddings = np.asarray(embeddings)
    _check(embeddings, branching)
    if backend not in BACKENDS:
        raise ClusteringError(f"unknown clustering backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = choose_backend(*embeddings.shape)
    residual = l2_normalize(embeddings)
    codebooks: list[np.ndarray] = []
    codes = np.empty((len(residual), len(branching)), dtype=np.int64)
    reseeded: list[int] = []
    energy: list[float] = []
    iterations: list[int] = []
    for r, k in enumerate(branching):
        centroids, n_iter = fit_level(residual, int(k), iters=iters, seed=seed + r, backend=backend,
                              sample=sample)
        min_size = max(1, math.ceil(min_cluster_share * len(residual) / int(k)))
        centroids, n_split = repair_small_clusters(residual, centroids, min_size)
        centroids, level_codes, n_reseeded = reseed_empty_clusters(residual, centroids)
        codebooks.append(centroids)
        codes[:, r] = level_codes
        reseeded.append(n_split + n_reseeded)
        iterations.append(n_iter)
        _subtract(residual, centroids, level_codes)
        energy.append(float(np.einsum("nd,nd->", residual, residual, dtype=np.float64)
                            / len(residual)))
    sizes = [np.bincount(codes[:, r], minlength=int(k)).tolist() for r, k in enumerate(branching)]
    return ResidualKMeansResult(codebooks=codebooks, codes=codes, sizes=sizes, backend=backend,
                                reseeded=reseeded, residual_energy=energy,
                                iterations=iterations)


def _subtract(residual: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> None:
    """residual -= centroids[codes], in place and in blocks (no second N x D array)."""
    for start in range(0, len(residual), _CHUNK):
        residual[start:start + _CHUNK] -= centroids[codes[start:start + _CHUNK]]


def assign_codes(embeddings: np.ndarray, codebooks: Sequence[np.ndarray]) -> np.ndarray:
    """Codes [N, R] of new embeddings under fitted codebooks (same arithmetic as the fit)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ClusteringError(f"embeddings must be a 2-D array [N, D], got shape {embeddings.shape}")
    books = [np.asarray(c, dtype=np.float32) for c in codebooks]
    if not books:
        raise ClusteringError("no codebooks given")
    for r, c in enumerate(books):
        if c.ndim != 2 or c.shape[1] != embeddings.shape[1]:
            raise ClusteringError(f"codebook level {r} has shape {c.shape}; expected [B, "
                                  f"{embeddings.shape[1]}] to match the embeddings")
    residual = l2_normalize(embeddings)
    codes = np.empty((len(residual), len(books)), dtype=np.int64)
    for r, c in enumerate(books):
        codes[:, r], _ = nearest(residual, c)
        _subtract(residual, c, codes[:, r])
    return codes
