"""Residual k-means: structure recovery, code consistency, no dead clusters, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from sdr_edge.clustering import (
    ClusteringError,
    assign_codes,
    choose_backend,
    fit_residual_kmeans,
    reseed_empty_clusters,
)
from sdr_edge.clustering.residual_kmeans import nearest, repair_small_clusters


def hierarchical_blobs(per_cell: int = 40, seed: int = 0):
    """4 coarse blobs, each holding the same 4 sub-blob offsets: what residual k-means models.

    Coarse centres (norm 10) and sub-blob offsets (norm 3) live on orthogonal axes, so every
    clean point has the same norm and L2 normalisation only rescales the structure.
    """
    rng = np.random.default_rng(seed)
    d = 16
    coarse = 10.0 * np.eye(d)[:4]
    fine = 3.0 * np.eye(d)[4:8]
    blob = np.repeat(np.arange(4), 4 * per_cell)
    sub = np.tile(np.repeat(np.arange(4), per_cell), 4)
    x = coarse[blob] + fine[sub] + rng.normal(scale=0.15, size=(len(blob), d))
    order = rng.permutation(len(blob))
    return x[order].astype(np.float32), blob[order], sub[order]


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_recovers_hierarchical_structure(backend, seed):
    # seeds 1 and 3 sent faiss's own k-means++ into a merged-blobs minimum at level 2
    x, blob, sub = hierarchical_blobs()
    result = fit_residual_kmeans(x, (4, 4), iters=20, seed=seed, backend=backend)
    assert result.backend == backend
    assert result.codes.shape == (len(x), 2) and result.codes.dtype == np.int64
    assert adjusted_rand_score(blob, result.codes[:, 0]) > 0.99
    assert adjusted_rand_score(sub, result.codes[:, 1]) > 0.99
    assert [len(c) for c in result.codebooks] == [4, 4]
    assert all(c.shape == (4, 16) and c.dtype == np.float32 for c in result.codebooks)
    assert result.sizes == [[160] * 4, [160] * 4]
    # the residual shrinks level by level: each level explains part of what is left
    assert result.residual_energy[0] > result.residual_energy[1]
    np.testing.assert_array_equal(assign_codes(x, result.codebooks), result.codes)


def test_assign_codes_generalises_to_new_points():
    x, blob, sub = hierarchical_blobs(seed=0)
    result = fit_residual_kmeans(x, (4, 4), seed=1)
    fresh, fresh_blob, fresh_sub = hierarchical_blobs(per_cell=10, seed=7)
    codes = assign_codes(fresh, result.codebooks)
    assert adjusted_rand_score(fresh_blob, codes[:, 0]) > 0.99
    assert adjusted_rand_score(fresh_sub, codes[:, 1]) > 0.99


def test_same_seed_same_codes():
    x, _, _ = hierarchical_blobs(per_cell=20)
    a = fit_residual_kmeans(x, (4, 2, 2), seed=3)
    b = fit_residual_kmeans(x, (4, 2, 2), seed=3)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_empty_cluster_is_reseeded():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 4)), rng.normal(5, 0.1, (50, 4))])
    x = x.astype(np.float32)
    dead = np.full(4, 100.0, dtype=np.float32)  # no point is anywhere near it
    centroids = np.stack([x[:50].mean(0), x[50:].mean(0), dead])
    fixed, codes, reseeds = reseed_empty_clusters(x, centroids)
    assert reseeds >= 1
    assert np.bincount(codes, minlength=3).min() >= 1
    assert not np.allclose(fixed[2], dead)
    assert any(np.allclose(fixed[2], p) for p in x)  # moved onto a real, worst-served point


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_duplicates_force_no_dead_cluster(backend):
    # 300 copies of one point and three outliers: any init that picks the mass twice leaves a
    # cluster empty; the fit must still give each of the 4 clusters a point
    rng = np.random.default_rng(1)
    x = np.concatenate([np.tile(rng.normal(size=(1, 8)), (300, 1)), rng.normal(size=(3, 8))])
    result = fit_residual_kmeans(x.astype(np.float32), (4,), backend=backend)
    assert min(result.sizes[0]) >= 1
    assert sorted(result.sizes[0]) == [1, 1, 1, 300]


def test_outlier_singleton_cluster_is_split_away():
    # a centroid parked on one far outlier gives its expert one image to learn from: it is
    # re-seeded by splitting the largest cluster along its principal axis
    x, blob, _ = hierarchical_blobs(per_cell=40)
    x = np.concatenate([x, np.full((1, 16), 100.0, dtype=np.float32)])
    centroids = np.stack([x[:-1][blob == b].mean(0) for b in range(4)] + [x[-1]])
    assert np.bincount(nearest(x, centroids)[0], minlength=5).min() == 1
    fixed, splits = repair_small_clusters(x, centroids, min_size=20)
    assert splits >= 1
    assert np.bincount(nearest(x, fixed)[0], minlength=5).min() >= 20


def test_fit_reports_no_small_clusters_on_real_images():
    from sdr_edge.data.sources import load_source

    source = load_source("builtin:digits", 16, 1)
    pixels = source.images.reshape(len(source), -1).astype(np.float32)
    result = fit_residual_kmeans(pixels, (4, 4, 4), iters=15)
    for sizes in result.sizes:
        assert min(sizes) >= 0.05 * len(pixels) / 4
    # digit identity is what pixels cluster by first: level 1 is far from random w.r.t. labels
    assert adjusted_rand_score(source.labels, result.codes[:, 0]) > 0.1


def test_too_few_distinct_points_is_a_clear_error():
    x = np.tile(np.ones((1, 4), dtype=np.float32), (10, 1))
    with pytest.raises(ClusteringError, match="distinct"):
        fit_residual_kmeans(x, (3,))


@pytest.mark.parametrize(("x", "branching", "message"), [
    (np.zeros((5, 4, 1), np.float32), (2,), "2-D"),
    (np.ones((3, 4), np.float32), (4,), "cannot fill 4"),
    (np.array([[np.nan, 1.0], [1.0, 0.0]], np.float32), (2,), "NaN"),
    (np.ones((8, 4), np.float32), (), "at least one level"),
    (np.ones((8, 4), np.float32), (2, 0), "at least one cluster"),
])
def test_bad_input_errors(x, branching, message):
    with pytest.raises(ClusteringError, match=message):
        fit_residual_kmeans(x, branching)


def test_unknown_backend_and_mismatched_codebook():
    x, _, _ = hierarchical_blobs(per_cell=5)
    with pytest.raises(ClusteringError, match="unknown clustering backend"):
        fit_residual_kmeans(x, (2,), backend="cuml")
    with pytest.raises(ClusteringError, match="level 0 has shape"):
        assign_codes(x, [np.zeros((4, 8), np.float32)])


def test_auto_backend_follows_the_measurements(monkeypatch):
    from sdr_edge.clustering import residual_kmeans

    gib = 2**30
    monkeypatch.setattr(residual_kmeans, "_physical_memory", lambda: 64 * gib)
    assert choose_backend(1797, 64) == "sklearn"  # measured faster
    assert choose_backend(1_281_167, 2048) == "sklearn"  # 29 GiB fits in 0.8 x 64 GiB
    monkeypatch.setattr(residual_kmeans, "_physical_memory", lambda: 32 * gib)
    assert choose_backend(1_281_167, 2048) == "faiss"  # only faiss's 20 GiB fits
    x, _, _ = hierarchical_blobs(per_cell=5)
    assert fit_residual_kmeans(x, (2,)).backend == "sklearn"
