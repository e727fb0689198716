"""The candidates' consensus score across a fleet, computed from statistics the nodes send.

`transferability.consensus_logme` clusters the M candidates' features side by side on one
device's images and scores each candidate by LogME against those clusters. A fleet's images are
split over nodes. Clustering each node's share alone and averaging the nodes' scores kept only
+0.87 of the pooled device's +1.27 points over a random sub-net (docs/claim.md, *Label-free
re-ranking*). This module computes the pooled score instead, in three exchanges:

1. **Standardiser.** Each node sends, per candidate, the count, sum and sum of squares of every
   feature dimension (`column_moments`). The server forms the mean and std that `standardised`
   would use on the pooled images (`fleet_standardiser`).
2. **Clusters.** k-FED (Dennis, Li & Smith, "Heterogeneity for the Win: One-Shot Federated
   Clustering", ICML 2021): each node runs k-means on its side-by-side matrix with at most k
   clusters, fewer where it holds fewer images, and sends the centroids and their sizes
   (`local_centroids`). The server clusters the centroids, weighted by size, into k fleet
   clusters (`fleet_centroids`). Non-IID nodes that each hold a few of the clusters are the
   case the paper shows k-FED handles best.
3. **Scores.** Each node labels its images by the nearest fleet centroid and sends, per
   candidate, the Gram matrix F^T F and F^T Y of its standardised features (`logme_moments`).
   Their sums are the pooled ones. LogME needs nothing more: the SVD it runs on the features is
   the eigendecomposition of the Gram matrix, so `logme_from_moments` on the sums equals
   `logme` on the pooled images.

What leaves a node: per-dimension sums, the centroids of its own clusters (each a mean over at
least `MIN_CLUSTER_IMAGES` images' features; smaller clusters are not sent), and Gram matrices.
No image, no label, no single image's features. That is more than the M numbers of the
per-node consensus. Secure aggregation would hide each node's sums, but not its centroids.
NumPy and scikit-learn only, like `transferability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdr_edge.routing.transferability import (
    CONSENSUS_CLUSTERS,
    CONSENSUS_SEEDS,
    TransferabilityError,
    logme_evidence,
    side_by_side,
)

MIN_CLUSTER_IMAGES = 5  # a node sends the centroid of a local cluster of at least this many


@dataclass(frozen=True)
class ColumnMoments:
    """One node's per-dimension statistics of each candidate's raw features."""

    count: int
    sums: np.ndarray  # M x D
    sumsq: np.ndarray  # M x D


def column_moments(features: Sequence[np.ndarray]) -> ColumnMoments:
    """Count, sum and sum of squares per feature dimension of each candidate (same images)."""
    f = np.stack([np.asarray(b, dtype=np.float64) for b in features])  # M x N x D
    return ColumnMoments(int(f.shape[1]), f.sum(axis=1), (f ** 2).sum(axis=1))


def fleet_standardiser(parts: Sequence[ColumnMoments]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled images' mean and std per candidate and dimension (M x D each), the ones
    `transferability.standardised` computes on one device."""
    n = sum(p.count for p in parts)
    if n < 2:
        raise TransferabilityError(f"the fleet's consensus needs at least 2 images, got {n}")
    mean = sum(p.sums for p in parts) / n
    var = np.maximum(sum(p.sumsq for p in parts) / n - mean ** 2, 0.0)
    return mean, np.sqrt(var)


def standardise(features: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray
                ) -> list[np.ndarray]:
    """Each candidate's features centred and scaled by the fleet's statistics (float64)."""
    return [(np.asarray(f, dtype=np.float64) - mean[i]) / (std[i] + 1e-6)
            for i, f in enumerate(features)]


def usable_clusters(images: int, clusters: Sequence[int] = CONSENSUS_CLUSTERS) -> list[int]:
    """The cluster counts the consensus can use on this many images (fewer clusters than images,
    as `consensus_logme` requires)."""
    return [k for k in clusters if 2 <= k < images]


def local_centroids(x: np.ndarray, clusters: int, seed: int,
                    min_images: int = MIN_CLUSTER_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """k-FED's device step: k-means with at most `clusters` clusters and at least `min_images`
    images per cluster on average; returns the centroids of the clusters of `min_images` or more
    and their sizes (possibly none)."""
    from sklearn.cluster import KMeans

    k = min(clusters, x.shape[0] // max(min_images, 1))
    if k < 1:
        return np.zeros((0, x.shape[1])), np.zeros(0, dtype=np.int64)
    if k == 1:
        centroids, labels = x.mean(axis=0, keepdims=True), np.zeros(x.shape[0], dtype=np.int64)
    else:
        fit = KMeans(k, n_init=3, random_state=seed).fit(x)
        centroids, labels = fit.cluster_centers_, fit.labels_
    sizes = np.bincount(labels, minlength=k)
    keep = sizes >= min_images
    return centroids[keep], sizes[keep]


def fleet_centroids(parts: Sequence[tuple[np.ndarray, np.ndarray]], clusters: int,
                    seed: int) -> np.ndarray | None:
    """k-FED's server step: the nodes' centroids clustered, weighted by their sizes, into
    `clusters` fleet centroids; None when the nodes sent fewer centroids than that (the
    clustering is skipped, as `consensus_logme` skips a cluster count above its images)."""
    from sklearn.cluster import KMeans

    points = np.concatenate([c for c, _ in parts])
    weights = np.concatenate([s for _, s in parts]).astype(np.float64)
    if points.shape[0] < clusters:
        return None
    if points.shape[0] == clusters:
        return points
    return KMeans(clusters, n_init=3, random_state=seed).fit(
        points, sample_weight=weights).cluster_centers_


def kept_clusterings(plan: Sequence[tuple[int, int]], centroids: Sequence[np.ndarray | None],
                     min_images: int = MIN_CLUSTER_IMAGES) -> tuple[list[int], list[np.ndarray]]:
    """The cluster counts and fleet centroids of the clusterings the nodes sent enough
    centroids for; a clear error when there is none."""
    kept = [(k, c) for (k, _), c in zip(plan, centroids, strict=True) if c is not None]
    if not kept:
        raise TransferabilityError(
            f"the fleet's nodes sent too few centroids for {min(k for k, _ in plan)} clusters "
            f"(a node sends only clusters of {min_images} images or more)")
    return [k for k, _ in kept], [c for _, c in kept]


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (squared Euclidean, as k-means assigns)."""
    d2 = (x ** 2).sum(axis=1)[:, None] - 2 * x @ centroids.T + (centroids ** 2).sum(axis=1)
    return np.argmin(d2, axis=1)


@dataclass(frozen=True)
class LogmeMoments:
    """One node's sufficient statistics of LogME, per candidate and clustering."""

    count: int
    gram: np.ndarray  # M x D x D: F^T F of each candidate's standardised features
    fty: list[np.ndarray]  # per clustering: M x D x k, F^T Y against the one-hot clusters
    class_counts: list[np.ndarray]  # per clustering: k, images per cluster


def logme_moments(blocks: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                  clusters: Sequence[int]) -> LogmeMoments:
    """F^T F and, for each clustering's labels (values below its cluster count), F^T Y."""
    f = np.stack(blocks)  # M x N x D
    gram = np.einsum("mnd,mne->mde", f, f)
    fty, counts = [], []
    for lab, k in zip(labels, clusters, strict=True):
        y = np.eye(k)[np.asarray(lab)]  # N x k
        fty.append(np.einsum("mnd,nk->mdk", f, y))
        counts.append(y.sum(axis=0))
    return LogmeMoments(int(f.shape[1]), gram, fty, counts)


def logme_from_moments(gram: np.ndarray, fty: np.ndarray, class_counts: np.ndarray, n: int,
                       iters: int = 100, tol: float = 1e-4) -> float:
    """LogME (You et al. 2021) from F^T F (D x D), F^T Y (D x C), the class sizes and N: equal
    to `transferability.logme` on the features themselves. F = U S V^T gives F^T F = V S^2 V^T
    and U^T Y = S^-1 V^T F^T Y; directions with no variance carry no evidence either way.
    Classes no image holds are left out, as `logme` sees only the classes present."""
    present = class_counts > 0
    eigvals, v = np.linalg.eigh(gram)
    keep = eigvals > max(float(eigvals.max()), 0.0) * 1e-12
    s2, v = eigvals[keep], v[:, keep]
    uty = (v.T @ fty[:, present]) / np.sqrt(s2)[:, None]
    evidence = logme_evidence(s2, uty, class_counts[present], n, gram.shape[0], iters, tol)
    return float(evidence.mean())


def fleet_scores(parts: Sequence[LogmeMoments]) -> list[float]:
    """Each candidate's consensus score from every node's LogME statistics: LogME of the summed
    moments per clustering, averaged over the clusterings (as `consensus_logme` averages)."""
    n = sum(p.count for p in parts)
    gram = sum(p.gram for p in parts)
    per_clustering = []
    for c in range(len(parts[0].fty)):
        fty = sum(p.fty[c] for p in parts)
        counts = sum(p.class_counts[c] for p in parts)
        per_clustering.append([logme_from_moments(gram[m], fty[m], counts, n)
                               for m in range(gram.shape[0])])
    return [float(v) for v in np.mean(per_clustering, axis=0)]


def clustering_plan(images: int, clusters: Sequence[int] = CONSENSUS_CLUSTERS,
                    seeds: int = CONSENSUS_SEEDS) -> list[tuple[int, int]]:
    """The (cluster count, seed) pairs the fleet clusters with, for the fleet's image count."""
    usable = usable_clusters(images, clusters)
    if not usable:
        raise TransferabilityError(f"consensus re-ranking needs more than {min(clusters)} "
                                   f"images on the fleet, got {images}")
    return [(k, s) for k in usable for s in range(seeds)]


def fleet_consensus_logme(shares: Sequence[Sequence[np.ndarray]],
                          clusters: Sequence[int] = CONSENSUS_CLUSTERS,
                          seeds: int = CONSENSUS_SEEDS,
                          min_images: int = MIN_CLUSTER_IMAGES) -> list[float]:
    """The three exchanges in one process: `shares[node][candidate]` is a node's N_node x D
    features of each candidate. What `sdr_edge.federated.fleet_rerank` runs over messages and
    `benchmarks/fleet_rerank.py` replays. With one node and `min_images=1` it equals
    `consensus_logme` on that node's images."""
    mean, std = fleet_standardiser([column_moments(s) for s in shares])
    blocks = [standardise(s, mean, std) for s in shares]
    matrices = [side_by_side(b) for b in blocks]
    plan = clustering_plan(sum(m.shape[0] for m in matrices), clusters, seeds)
    counts, centroids = kept_clusterings(plan, [
        fleet_centroids([local_centroids(x, k, seed, min_images) for x in matrices], k, seed)
        for k, seed in plan], min_images)
    moments = [logme_moments(b, [nearest(x, c) for c in centroids], counts)
               for b, x in zip(blocks, matrices, strict=True)]
    return fleet_scores(moments)
