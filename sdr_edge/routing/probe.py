"""Frozen-feature evaluation shared by route-eval and the benchmarks: features, linear probe, kNN.

Features use the evaluation transform (`normalize_batch` on uint8 images at the spec size), so
the numbers match what a client would see from the same sub-net.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.errors import SdrEdgeError
from sdr_edge.ssl.knn import knn_accuracy


class ProbeError(SdrEdgeError, ValueError):
    """A task's labelled split cannot be probed (e.g. it holds a single class)."""


@torch.no_grad()
def extract_features(model: nn.Module, images_uint8: np.ndarray, spec: InputSpec,
                     batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """N x H x W x C uint8 (at the spec size) -> N x D float32 features, model in eval mode."""
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for start in range(0, images_uint8.shape[0], batch_size):
            x = torch.from_numpy(normalize_batch(images_uint8[start:start + batch_size], spec))
            out.append(model(x.to(device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def linear_probe(c: float = 1.0, max_iter: int = 2000, seed: int = 0):
    """The probe every sub-net is judged by: multinomial logistic regression on standardised
    features (an unfitted scikit-learn pipeline)."""
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, max_iter=max_iter, random_state=seed))


def linear_probe_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                          test_y: np.ndarray, *, c: float = 1.0, max_iter: int = 2000,
                          seed: int = 0) -> float:
    """`linear_probe` fitted on the train features; test accuracy in [0, 1]."""
    if len(np.unique(train_y)) < 2:
        raise ProbeError("a linear probe needs at least two classes in the training split")
    probe = linear_probe(c, max_iter, seed)
    # A probe this size is BLAS-bound on tiny matrices: one thread is ~50x faster than two
    # spin-waiting OpenBLAS threads on a busy 2-core machine (measured 0.03 s vs 1.5 s).
    with threadpool_limits(limits=1):
        probe.fit(train_f, train_y)
        return float((probe.predict(test_f) == test_y).mean())


def knn_probe_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                       test_y: np.ndarray, k: int = 20) -> float:
    """Cosine kNN (sdr_edge.ssl.knn_accuracy) on NumPy features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return knn_accuracy(torch.from_numpy(np.ascontiguousarray(train_f)),
                        torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
                        torch.from_numpy(np.ascontiguousarray(test_f)),
                        torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
                        k=k, num_classes=num_classes)
