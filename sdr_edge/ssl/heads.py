"""SimSiam projection and prediction heads (lightly-style small pieces)."""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """SimSiam projector: Linear-BN-ReLU x2, then Linear-BN without affine."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
        )


class PredictionHead(nn.Sequential):
    """SimSiam predictor: a bottleneck MLP out_dim -> hidden -> out_dim."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
            nn.Linear(hidden_dim, dim),
        )


class SimSiamHeads(nn.Module):
    """Projector and predictor on top of any encoder's pooled features."""

    def __init__(self, feature_dim: int, proj_dim: int = 256, pred_hidden: int = 64) -> None:
        super().__init__()
        self.projector = ProjectionHead(feature_dim, proj_dim, proj_dim)
        self.predictor = PredictionHead(proj_dim, pred_hidden)
        self.dims = {"feature_dim": feature_dim, "proj_dim": proj_dim, "pred_hidden": pred_hidden}
