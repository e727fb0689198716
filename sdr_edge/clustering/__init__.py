"""Residual or hierarchical (tree) k-means: how unlabeled images get their routing codes."""

from sdr_edge.clustering.residual_kmeans import (
    BACKENDS,
    ClusteringError,
    ResidualKMeansResult,
    assign_codes,
    choose_backend,
    fit_residual_kmeans,
    l2_normalize,
    reseed_empty_clusters,
)
from sdr_edge.clustering.tree_kmeans import assign_tree_codes, fit_tree_kmeans

__all__ = [
    "BACKENDS",
    "ClusteringError",
    "ResidualKMeansResult",
    "assign_codes",
    "assign_tree_codes",
    "choose_backend",
    "fit_residual_kmeans",
    "fit_tree_kmeans",
    "l2_normalize",
    "reseed_empty_clusters",
]
