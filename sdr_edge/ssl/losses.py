"""SimSiam's symmetric negative cosine with stop-gradient, and SiamKD's distillation term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-cos(p, stopgrad(z)), averaged over the batch (in [-1, 1])."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss: D(p1, z2)/2 + D(p2, z1)/2."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def siamkd_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                t1: torch.Tensor, t2: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """SiamKD: (1 - w) * SimSiam + w * pull of the student's predictions toward the frozen
    teacher's projection of the *other* view. w = 0 is plain SimSiam, w = 1 pure distillation."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")
    distill = 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))
    return (1.0 - kd_weight) * simsiam_loss(p1, p2, z1, z2) + kd_weight * distill
