"""Tree codes (hierarchical k-means): recovers nested clusters residual codes cannot, and the
assignment of new points reproduces the fit's codes."""

import numpy as np
import pytest

from sdr_edge.clustering import (
    ClusteringError,
    assign_tree_codes,
    fit_residual_kmeans,
    fit_tree_kmeans,
)
from sdr_edge.clustering.streamed import fit_sample_assign_chunks
from sdr_edge.clustering.tree_kmeans import tree_branching, tree_nodes


def _nested_blobs(seed: int = 0, per_leaf: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """4 far-apart parents, each split into 4 children whose offsets differ per parent: the
    leaf structure that a shared residual codebook cannot describe."""
    rng = np.random.default_rng(seed)
    parents = rng.normal(size=(4, 16)) * 5.0
    children = rng.normal(size=(4, 4, 16))
    x = np.concatenate([parents[i] + children[i, j] + 0.05 * rng.normal(size=(per_leaf, 16))
                        for i in range(4) for j in range(4)])
    return x.astype(np.float32), np.repeat(np.arange(16), per_leaf)


def _purity(cells: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.bincount(truth[cells == c]).max() for c in np.unique(cells)) / len(truth)


def test_tree_codes_recover_nested_clusters_that_residual_codes_mix():
    x, leaf = _nested_blobs()
    tree = fit_tree_kmeans(x, (4, 4), backend="sklearn")
    assert [c.shape for c in tree.codebooks] == [(4, 16), (16, 16)]
    assert tree.sizes[1] == [40] * 16
    assert _purity(tree_nodes(tree.codes, (4, 4))[:, 1], leaf) == 1.0
    residual = fit_residual_kmeans(x, (4, 4), backend="sklearn")
    cells = residual.codes[:, 0] * 4 + residual.codes[:, 1]
    assert _purity(cells, leaf) < 0.9
    assert tree.residual_energy[1] < 0.1 * residual.residual_energy[1]


def test_assigning_new_points_reproduces_the_fit_and_the_streamed_path_agrees():
    x, _ = _nested_blobs(seed=1)
    tree = fit_tree_kmeans(x, (4, 4), backend="sklearn")
    assert np.array_equal(assign_tree_codes(x, tree.codebooks), tree.codes)
    streamed = fit_sample_assign_chunks(x, (4, 4), backend="sklearn", chunk_rows=97, tree=True)
    assert np.array_equal(streamed.codes, tree.codes)
    assert streamed.sizes[1] == tree.sizes[1]
    jitter = x + 0.01 * np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    assert np.array_equal(assign_tree_codes(jitter, tree.codebooks), tree.codes)


def test_tree_errors_name_the_node_and_the_level():
    x, _ = _nested_blobs(per_leaf=1)  # 16 points: 4 per parent cannot be split into 8
    with pytest.raises(ClusteringError, match=r"tree level 1: node \d holds \d+ image"):
        fit_tree_kmeans(x, (4, 8), backend="sklearn")
    with pytest.raises(ClusteringError, match="tree codebook level 1 has 6 rows"):
        tree_branching([np.zeros((4, 2)), np.zeros((6, 2))])
