"""Split one labelled data set into per-client partitions: IID or Dirichlet(alpha) non-IID.

Every client computes its own partition from the same seed, so the partitions are disjoint
and together cover the data set without any coordination. The Dirichlet scheme follows the
usual recipe (Hsu et al. 2019): for each class, the share each client receives is drawn from
Dir(alpha); small alpha gives clients few classes, large alpha approaches IID.
"""

from __future__ import annotations

import numpy as np


def iid_partition(n: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded random split of range(n) into `num_partitions` near-equal sorted parts."""
    _check(n, num_partitions)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0,
                        min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: class c's images are shared out with proportions ~ Dir(alpha).

    Redraws (up to `max_tries`) until every partition holds at least `min_size` images, so no
    client is left without data to train and evaluate on.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if len(labels) < num_partitions * min_size:
        raise ValueError(f"{len(labels)} images cannot give {num_partitions} partitions of at "
                         f"least {min_size} images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not draw {num_partitions} Dirichlet(alpha={alpha}) partitions with "
                     f"at least {min_size} images each in {max_tries} tries; raise alpha or use "
                     "fewer partitions")


def partition(labels: np.ndarray | None, n: int, num_partitions: int, alpha: float | None,
              seed: int = 0) -> list[np.ndarray]:
    """IID when alpha is None or <= 0, Dirichlet(alpha) otherwise (needs labels)."""
    if alpha is None or alpha <= 0:
        return iid_partition(n, num_partitions, seed)
    if labels is None:
        raise ValueError("a Dirichlet partition needs labelled data (alpha > 0 given)")
    return dirichlet_partition(labels, num_partitions, alpha, seed)


def train_test_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into (train, held-out) index arrays; both non-empty when n >= 2."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out for evaluation, have {n}")
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _check(n: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if n < num_partitions:
        raise ValueError(f"cannot split {n} images into {num_partitions} partitions")
