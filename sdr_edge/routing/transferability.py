"""Scores that re-rank a few candidate sub-nets on the device, from their features on local images.

The signature route is label-free and needs nothing but the kit; it picks by similarity of the
data, and similar data is not always the most useful (DESIGN.md: the glyphs, not the clothes,
helped footwear). These scores look at the candidate's *features* on the device's own images:

* **RankMe** (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023): the effective rank of the feature
  matrix, ``exp(H(p))`` with ``p_k = σ_k / ||σ||_1 + ε``. Label-free; higher is better.
* **consensus** (label-free): each candidate's LogME against pseudo-labels that all M
  candidates agree on, k-means clusters of their features side by side (`consensus_logme`).
  Unlike RankMe it rewards features that carry the structure the candidates share, not spread.
  Averaged over 9 clusterings (16, 32 and 64 clusters, 3 seeds each); needs more than 16
  local images. Higher is better.
* **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): the log marginal evidence of a Bayesian linear model from features to
  one-hot labels, maximised over its prior and noise precisions by the paper's fixed-point
  iteration, averaged over classes and divided by N. Needs a few labels; higher is better.
* **kNN** leave-one-out accuracy on the labelled images (cosine, k neighbours).
* **probe**: the cross-validated accuracy of the very linear probe the sub-net is judged by
  (standardised features, multinomial logistic regression; stratified k-fold over the labelled
  images, scikit-learn's ``cross_val_score``). The direct estimate that LogME approximates in
  closed form ("Ranking models by linear-probe validation accuracy" is the baseline of the
  transferability literature, e.g. Kornblith et al., "Do Better ImageNet Models Transfer
  Better?", CVPR 2019); it costs k probe fits per candidate.

Written here rather than taken from a package: RankMe is three lines of NumPy, LogME's
reference code (thuml/LogME) is not published on PyPI, and the consensus score is scikit-learn's
KMeans plus LogME.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np

from sdr_edge.errors import SdrEdgeError

RANKME_EPS = 1e-7


class TransferabilityError(SdrEdgeError, ValueError):
    """Features, labels or a method a transferability score cannot use (one line)."""


def rankme(features: np.ndarray) -> float:
    """Effective rank of an N x D feature matrix (RankMe, Garrido et al. 2023, eq. 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise TransferabilityError(f"rankme needs an N x D matrix with N >= 2, got shape {f.shape}")
    sigma = np.linalg.svd(f, compute_uv=False)
    total = sigma.sum()
    if total <= 0:
        return 1.0
    p = sigma / total + RANKME_EPS
    return float(np.exp(-(p * np.log(p)).sum()))


def logme_evidence(s2: np.ndarray, uty: np.ndarray, y_norm2: np.ndarray, n: int, d: int,
                    iters: int, tol: float) -> np.ndarray:
    """Evidence per target column (C columns at once): the paper's fixed-point updates of alpha
    (prior precision) and beta (noise precision), each column until its own convergence."""
    s2 = s2[:, None]  # r x 1 against uty: r x C
    c = uty.shape[1]
    alpha, beta = np.ones(c), np.ones(c)
    # Residual of y outside the span of the features does not depend on alpha or beta.
    res_outside = np.maximum(y_norm2 - (uty ** 2).sum(axis=0), 0.0)
    active = np.ones(c, dtype=bool)

    def moments(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        denom = (alpha + beta * s2) ** 2
        m2 = (beta ** 2 * s2 * uty ** 2 / denom).sum(axis=0)
        res = (alpha ** 2 * uty ** 2 / denom).sum(axis=0) + res_outside
        return m2, res

    for _ in range(iters):
        gamma = (beta * s2 / (alpha + beta * s2)).sum(axis=0)
        m2, res = moments(alpha, beta)
        new_alpha = np.where(active, gamma / np.maximum(m2, 1e-12), alpha)
        new_beta = np.where(active, (n - gamma) / np.maximum(res, 1e-12), beta)
        done = (np.abs(new_alpha - alpha) / alpha < tol) & (np.abs(new_beta - beta) / beta < tol)
        alpha, beta = new_alpha, new_beta
        active &= ~done
        if not active.any():
            break
    m2, res = moments(alpha, beta)
    logdet = np.log(alpha + beta * s2).sum(axis=0) + (d - s2.shape[0]) * np.log(alpha)
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * res - alpha / 2 * m2 - logdet / 2)
    return evidence / n


def logme(features: np.ndarray, labels: np.ndarray, iters: int = 100, tol: float = 1e-4) -> float:
    """LogME of features for integer labels (You et al. 2021, Algorithm 1), mean over classes
    (one-hot targets, every class's evidence maximised on its own, all classes at once)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] < 2:
        raise TransferabilityError(f"logme needs N x D features and N labels, got {f.shape} and {y.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    targets = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)  # N x C one-hot
    evidence = logme_evidence(s ** 2, u.T @ targets, (targets ** 2).sum(axis=0), n, d,
                               iters, tol)
    return float(evidence.mean())


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy with cosine similarity (majority vote)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.shape[0] < 2:
        raise TransferabilityError("knn needs at least two labelled images")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, f.shape[0] - 1)
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    classes = np.unique(y)
    votes = (y[nearest][:, :, None] == classes[None, None, :]).sum(axis=1)
    return float((classes[votes.argmax(axis=1)] == y).mean())


def probe_cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                      seed: int = 0) -> float:
    """Mean stratified k-fold accuracy of `routing.probe.linear_probe` on the labelled images;
    k drops to the smallest class's count when a class has fewer images."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from threadpoolctl import threadpool_limits

    from sdr_edge.routing.probe import linear_probe

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise TransferabilityError(f"probe needs N x D features and N labels, got {f.shape} and {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        raise TransferabilityError("probe re-ranking needs two classes with at least two "
                                   f"labelled images each, got counts {counts.tolist()}")
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with threadpool_limits(limits=1):  # tiny BLAS problems: one thread (see routing.probe)
        return float(cross_val_score(linear_probe(seed=seed), f, y, cv=splits).mean())


# The consensus score's clusterings: k-means at each cluster count, with each seed; the score
# is the mean over them. One clustering is a single k-means draw, and which local optimum it
# finds moves the pick (docs/claim.md, *Label-free re-ranking*: the same images in another
# order took the held-out gain from +0.86 to +0.42); the mean over 9 draws is steadier.
CONSENSUS_CLUSTERS = (16, 32, 64)
CONSENSUS_SEEDS = 3


def standardised(features: np.ndarray) -> np.ndarray:
    """Features centred and scaled to unit variance per dimension (float64)."""
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0)
    return f / (f.std(axis=0) + 1e-6)


def side_by_side(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Standardised candidates' features as one matrix, each image's block scaled to unit
    length, so every candidate weighs the same."""
    if not blocks or any(b.ndim != 2 or b.shape[0] != blocks[0].shape[0] for b in blocks):
        raise TransferabilityError("consensus needs one N x D feature matrix per candidate, "
                                   "all of the same N images")
    return np.concatenate([b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
                           for b in blocks], axis=1)


def _kmeans_labels(x: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if clusters < 2 or x.shape[0] <= clusters:
        raise TransferabilityError(f"consensus re-ranking with {clusters} clusters needs more "
                                   f"than {clusters} local images, got {x.shape[0]}")
    return KMeans(clusters, n_init=3, random_state=seed).fit_predict(x)


def consensus_labels(features: Sequence[np.ndarray], clusters: int = 32,
                     seed: int = 0) -> np.ndarray:
    """Pseudo-labels of the local images that every candidate's features agree on: k-means over
    the candidates' features side by side. Clustering the concatenated views is the
    cluster-ensemble idea of Strehl & Ghosh, "Cluster Ensembles", JMLR 2002."""
    return _kmeans_labels(side_by_side([standardised(f) for f in features]), clusters, seed)


def consensus_logme(features: Sequence[np.ndarray],
                    clusters: Sequence[int] | int = CONSENSUS_CLUSTERS,
                    seeds: int = CONSENSUS_SEEDS) -> list[float]:
    """Label-free: each candidate's LogME (You et al. 2021) against `consensus_labels` of all
    candidates, averaged over the clusterings (every cluster count below the image count, each
    with `seeds` k-means seeds). No single sub-net's features hold the task's classes as well
    as the M of them together; the candidate whose features best predict their common clusters
    is the one that carries the structure the others agree on, not one that is merely spread
    out (what RankMe rewards). Measured in benchmarks/label_budget.py and
    benchmarks/label_free_scores.py (docs/claim.md, *Label-free re-ranking*)."""
    counts = [clusters] if isinstance(clusters, int) else list(clusters)
    blocks = [standardised(f) for f in features]
    x = side_by_side(blocks)  # clustered 9 times: built once
    usable = [k for k in counts if 2 <= k < x.shape[0]]
    if not usable:
        raise TransferabilityError(f"consensus re-ranking needs more than {min(counts)} local "
                                   f"images, got {x.shape[0]}")
    per_clustering = [[logme(b, labels) for b in blocks]
                      for k in usable for seed in range(seeds)
                      for labels in [_kmeans_labels(x, k, seed)]]
    return [float(v) for v in np.mean(per_clustering, axis=0)]


# One list for the library, `sdr-client fetch --rerank` and the agent's `[registry] rerank`.
RerankMethod = Literal["rankme", "consensus", "logme", "knn", "probe"]
RERANK_METHODS: tuple[str, ...] = get_args(RerankMethod)
LABELLED_METHODS = ("logme", "knn", "probe")
LABEL_FREE_METHODS = ("rankme", "consensus")
JOINT_METHODS = ("consensus",)  # a candidate's score depends on the other candidates too


def score_features(method: str, features: np.ndarray, labels: np.ndarray | None = None) -> float:
    """One candidate's re-ranking score by `method` (labels needed for all but rankme; the
    joint consensus score needs every candidate at once: `score_candidates`)."""
    if method == "rankme":
        return rankme(features)
    if method not in RERANK_METHODS:
        raise TransferabilityError(f"unknown re-ranking method {method!r} ({', '.join(RERANK_METHODS)})")
    if method in JOINT_METHODS:
        raise TransferabilityError(f"{method} scores the candidates together: use score_candidates")
    if labels is None:
        raise TransferabilityError(f"re-ranking by {method} needs labels for the local images")
    if method == "probe":
        return probe_cv_accuracy(features, labels)
    return logme(features, labels) if method == "logme" else knn_loo_accuracy(features, labels)


def score_candidates(method: str, features: Sequence[np.ndarray],
                     labels: np.ndarray | None = None) -> list[float]:
    """Every candidate's score by `method`, from each one's features on the same local images
    (in candidate order)."""
    if method == "consensus":
        return consensus_logme(features)
    return [score_features(method, f, labels) for f in features]


def rerank(candidates: Sequence[tuple[int, ...]],
           features_of: Callable[[tuple[int, ...]], np.ndarray], method: str,
           labels: np.ndarray | None = None) -> list[tuple[tuple[int, ...], float]]:
    """Candidates ordered by `method`'s score of their features, best first (stable on ties)."""
    routes = [tuple(c) for c in candidates]
    scores = score_candidates(method, [features_of(c) for c in routes], labels)
    order = sorted(range(len(routes)), key=lambda i: (-scores[i], i))
    return [(routes[i], scores[i]) for i in order]
