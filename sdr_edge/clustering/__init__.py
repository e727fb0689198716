"""Residual k-means: how unlabeled images get their routing codes."""

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

__all__ = [
    "BACKENDS",
    "ClusteringError",
    "ResidualKMeansResult",
    "assign_codes",
    "choose_backend",
    "fit_residual_kmeans",
    "l2_normalize",
    "reseed_empty_clusters",
]
