"""Scores that re-rank a few candidate sub-nets on the device, from their features on local images.

The signature route is label-free and needs nothing but the kit; it picks by similarity of the
data, and similar data is not always the most useful (DESIGN.md: the glyphs, not the clothes,
helped footwear). These scores look at the candidate's *features* on the device's own images:

* **RankMe** (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023): the effective rank of the feature
  matrix, ``exp(H(p))`` with ``p_k = σ_k / ||σ||_1 + ε``. Label-free; higher is better.
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

Written here rather than taken from a package: RankMe is three lines of NumPy, and LogME's
reference code (thuml/LogME) is not published on PyPI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def _logme_one(s2: np.ndarray, uty: np.ndarray, y_norm2: float, n: int, d: int,
               iters: int, tol: float) -> float:
    """Evidence of one target column; fixed-point updates of alpha (prior) and beta (noise)."""
    alpha, beta = 1.0, 1.0
    # Residual of y outside the span of the features does not depend on alpha or beta.
    res_outside = max(y_norm2 - float((uty ** 2).sum()), 0.0)
    for _ in range(iters):
        gamma = float((beta * s2 / (alpha + beta * s2)).sum())
        m2 = float((beta ** 2 * s2 * uty ** 2 / (alpha + beta * s2) ** 2).sum())
        res = float((alpha ** 2 * uty ** 2 / (alpha + beta * s2) ** 2).sum()) + res_outside
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = (n - gamma) / max(res, 1e-12)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    m2 = float((beta ** 2 * s2 * uty ** 2 / (alpha + beta * s2) ** 2).sum())
    res = float((alpha ** 2 * uty ** 2 / (alpha + beta * s2) ** 2).sum()) + res_outside
    logdet = float(np.log(alpha + beta * s2).sum()) + (d - s2.shape[0]) * np.log(alpha)
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * res - alpha / 2 * m2 - logdet / 2)
    return float(evidence / n)


def logme(features: np.ndarray, labels: np.ndarray, iters: int = 100, tol: float = 1e-4) -> float:
    """LogME of features for integer labels (You et al. 2021, Algorithm 1), mean over classes."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] < 2:
        raise TransferabilityError(f"logme needs N x D features and N labels, got {f.shape} and {y.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    s2 = s ** 2
    scores = []
    for cls in np.unique(y):
        target = (y == cls).astype(np.float64)
        scores.append(_logme_one(s2, u.T @ target, float(target @ target), n, d, iters, tol))
    return float(np.mean(scores))


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


RERANK_METHODS = ("rankme", "logme", "knn", "probe")
LABELLED_METHODS = ("logme", "knn", "probe")


def score_features(method: str, features: np.ndarray, labels: np.ndarray | None = None) -> float:
    """One candidate's re-ranking score by `method` (labels needed for all but rankme)."""
    if method == "rankme":
        return rankme(features)
    if method not in RERANK_METHODS:
        raise TransferabilityError(f"unknown re-ranking method {method!r} ({', '.join(RERANK_METHODS)})")
    if labels is None:
        raise TransferabilityError(f"re-ranking by {method} needs labels for the local images")
    if method == "probe":
        return probe_cv_accuracy(features, labels)
    return logme(features, labels) if method == "logme" else knn_loo_accuracy(features, labels)


def rerank(candidates: Sequence[tuple[int, ...]],
           features_of: Callable[[tuple[int, ...]], np.ndarray], method: str,
           labels: np.ndarray | None = None) -> list[tuple[tuple[int, ...], float]]:
    """Candidates ordered by `method`'s score of their features, best first (stable on ties)."""
    scored = [(tuple(c), score_features(method, features_of(tuple(c)), labels))
              for c in candidates]
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))
    return [scored[i] for i in order]
