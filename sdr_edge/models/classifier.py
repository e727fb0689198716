"""A sub-net with an optional linear head: what bundles hold, fine-tuning trains and export runs."""

from __future__ import annotations

import torch
from torch import nn

from sdr_edge.models.resnet import Backbone, BackboneConfig


class SubnetModel(nn.Module):
    """Backbone features, or class logits when the model has a head."""

    def __init__(self, backbone: Backbone, num_classes: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes) if num_classes else None

    @property
    def num_classes(self) -> int | None:
        return None if self.head is None else self.head.out_features

    def arch_dict(self) -> dict:
        return {"backbone": self.backbone.cfg.to_dict(), "num_classes": self.num_classes}

    @classmethod
    def from_arch_dict(cls, d: dict) -> SubnetModel:
        return cls(Backbone(BackboneConfig.from_dict(d["backbone"])), d.get("num_classes"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return feats if self.head is None else self.head(feats)
