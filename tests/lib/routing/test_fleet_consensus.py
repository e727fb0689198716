"""The fleet's consensus score from the nodes' statistics: exact where it must be, close to the
pooled device where k-FED's clusters approximate the pooled k-means."""

import numpy as np
import pytest

from sdr_edge.routing.fleet_consensus import (
    column_moments,
    fleet_centroids,
    fleet_consensus_logme,
    fleet_scores,
    fleet_standardiser,
    local_centroids,
    logme_from_moments,
    logme_moments,
)
from sdr_edge.routing.transferability import (
    TransferabilityError,
    consensus_logme,
    logme,
    standardised,
)


def _candidates(n: int = 360, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three candidates on the same images: one carries the 6 latent groups clearly, one noisily,
    one not at all (the order the consensus score must find)."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 6, size=n)
    centres = rng.normal(size=(6, 16)) * 3
    return [centres[groups] + rng.normal(size=(n, 16)),
            centres[groups] + 3.0 * rng.normal(size=(n, 16)),
            rng.normal(size=(n, 16))], groups


def test_logme_from_moments_equals_logme_on_the_pooled_features() -> None:
    feats, groups = _candidates()
    f = standardised(feats[0])
    labels = groups.copy()
    labels[labels == 4] = 0  # a class no image holds (cluster 4 empty) is left out, like logme
    k = 6
    parts = [logme_moments([f[i::4]], [labels[i::4]], [k]) for i in range(4)]
    gram = sum(p.gram for p in parts)[0]
    fty = sum(p.fty[0] for p in parts)[0]
    counts = sum(p.class_counts[0] for p in parts)
    assert logme_from_moments(gram, fty, counts, len(f)) == pytest.approx(logme(f, labels),
                                                                          abs=1e-9)
    # fewer images than dimensions: the Gram matrix is singular, LogME still agrees
    few = f[:10]
    m = logme_moments([few], [labels[:10]], [k])
    assert logme_from_moments(m.gram[0], m.fty[0][0], m.class_counts[0], 10) == pytest.approx(
        logme(few, labels[:10]), abs=1e-8)


def test_fleet_standardiser_is_the_pooled_one() -> None:
    feats, _ = _candidates()
    shares = [[f[i::3] for f in feats] for i in range(3)]
    mean, std = fleet_standardiser([column_moments(s) for s in shares])
    for i, f in enumerate(feats):
        assert np.allclose(mean[i], f.mean(axis=0)) and np.allclose(std[i], f.std(axis=0))
    with pytest.raises(TransferabilityError, match="at least 2 images"):
        fleet_standardiser([column_moments([f[:1] for f in feats])])


def test_one_node_is_the_device_consensus() -> None:
    feats, _ = _candidates()
    assert fleet_consensus_logme([feats], min_images=1) == pytest.approx(
        consensus_logme(feats), abs=1e-9)


def test_non_iid_nodes_keep_the_order_of_the_pooled_consensus() -> None:
    """Ten nodes, each holding two or three of the six groups (the skew k-FED is built for):
    the fleet's scores rank the candidates as the pooled device does. Its clusters are k-FED's,
    not the pooled k-means', so the values differ a little."""
    feats, groups = _candidates(n=900, seed=3)
    rng = np.random.default_rng(4)
    held = [rng.choice(6, size=int(rng.integers(2, 4)), replace=False) for _ in range(10)]
    owner = np.array([rng.choice([i for i, h in enumerate(held) if g in h] or [0])
                      for g in groups])
    shares = [[f[owner == i] for f in feats] for i in range(10) if (owner == i).any()]
    fleet = fleet_consensus_logme(shares)
    pooled = consensus_logme(feats)
    assert np.argsort(fleet).tolist() == np.argsort(pooled).tolist() == [2, 1, 0]
    assert np.allclose(fleet, pooled, atol=0.1)


def test_local_centroids_send_only_clusters_of_enough_images() -> None:
    feats, _ = _candidates(n=40)
    x = standardised(feats[0])
    centroids, sizes = local_centroids(x, 16, seed=0, min_images=5)
    assert len(centroids) == len(sizes) <= 40 // 5 and (sizes >= 5).all()
    assert local_centroids(x[:4], 16, seed=0, min_images=5)[0].shape == (0, 16)
    # the server needs at least as many centroids as fleet clusters
    assert fleet_centroids([(centroids, sizes)], len(centroids) + 1, seed=0) is None
    with pytest.raises(TransferabilityError, match="too few centroids"):
        fleet_consensus_logme([[f[i::8] for f in feats] for i in range(8)])  # 5 images a node
    with pytest.raises(TransferabilityError, match="more than 16 images"):
        fleet_consensus_logme([[f[:8] for f in feats], [f[8:16] for f in feats]])


def test_fleet_scores_average_the_clusterings() -> None:
    feats, groups = _candidates()
    blocks = [standardised(f) for f in feats]
    m = logme_moments(blocks, [groups, groups % 3], [6, 3])
    expected = np.mean([[logme(b, groups) for b in blocks], [logme(b, groups % 3) for b in blocks]],
                       axis=0)
    assert fleet_scores([m]) == pytest.approx(expected, abs=1e-9)
