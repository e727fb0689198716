"""Weighted kNN accuracy on frozen features: a label-free training signal's monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.1,
                 num_classes: int | None = None) -> float:
    """Cosine kNN with exponential vote weights (as in InstDisc / lightly's monitor)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], 1024):
        sim = test[start:start + 1024] @ train.T
        weights, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], torch.exp(weights / temperature))
        correct += int((votes.argmax(1) == test_labels[start:start + 1024]).sum())
    return correct / max(test.shape[0], 1)
