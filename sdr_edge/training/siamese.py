"""The trainable SimSiam pair (encoder + heads), the frozen SiamKD teacher and the optimiser.

Both views go through one `forward` call, so a DistributedDataParallel wrapper sees exactly one
forward per backward (two calls would break DDP's unused-parameter bookkeeping), while each
view still gets its own BatchNorm statistics as in SimSiam.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sdr_edge.models.resnet import Backbone
from sdr_edge.models.sdrnet import SDRnet
from sdr_edge.ssl.heads import SimSiamHeads
from sdr_edge.training.config import SSLConfig


class SiameseNet(nn.Module):
    """An encoder (Backbone, or SDRnet routed by codes) with SimSiam's projector and predictor."""

    def __init__(self, encoder: Backbone | SDRnet, heads: SimSiamHeads) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def encode(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x) if codes is None else self.encoder(x, codes)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, codes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p1, p2, z1, z2): predictions and projections of both views."""
        z1 = self.heads.projector(self.encode(x1, codes))
        z2 = self.heads.projector(self.encode(x2, codes))
        return self.heads.predictor(z1), self.heads.predictor(z2), z1, z2


class FrozenTeacher(nn.Module):
    """The phase-0 backbone and projector, frozen in eval mode: SiamKD's distillation target."""

    def __init__(self, backbone: Backbone, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # never leaves eval mode: its BN statistics are fixed

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def scaled_lr(ssl: SSLConfig, global_batch: int) -> float:
    """SimSiam's linear scaling rule: lr = base_lr x batch / 256."""
    return ssl.lr * global_batch / 256.0


def make_optimizer(model: SiameseNet, ssl: SSLConfig, global_batch: int,
                   scaled: Sequence[tuple[Sequence[nn.Parameter], float]] = ()) -> torch.optim.SGD:
    """SGD; the predictor keeps a fixed learning rate (SimSiam's fix_pred_lr), the rest decays.

    `scaled` gives parameter groups whose decaying rate is multiplied (`lr_mult`): the routed
    experts under `[schedule] expert_lr = "per-cell"`."""
    lr = scaled_lr(ssl, global_batch)
    pred = list(model.heads.predictor.parameters())
    taken = {id(p) for p in pred}
    extra = []
    for params, mult in scaled:
        group = [p for p in params if id(p) not in taken]
        taken.update(id(p) for p in group)
        if group:
            extra.append({"params": group, "fix_lr": False, "lr_mult": float(mult)})
    rest = [p for p in model.parameters() if id(p) not in taken]
    return torch.optim.SGD(
        [{"params": rest, "fix_lr": False}, {"params": pred, "fix_lr": True}, *extra],
        lr=lr, momentum=ssl.momentum, weight_decay=ssl.weight_decay,
        foreach=True,  # one fused update over all tensors: SDRnets hold many expert tensors
    )


def set_cosine_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay over a phase, as a pure function of the step (so a resume lands exactly)."""
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    for group in opt.param_groups:
        group["lr"] = base_lr if group.get("fix_lr") else lr * group.get("lr_mult", 1.0)
    return lr


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse monitor (Chen & He 2021, Fig. 2): the std over the batch of each
    dimension of the L2-normalised outputs, averaged over dimensions. About 1/sqrt(d) when the
    outputs spread over the sphere, 0 when they collapse to one vector. A 0-d tensor (no host
    synchronisation: the caller reads it once per epoch)."""
    return torch.nn.functional.normalize(z.detach().float(), dim=1).std(dim=0).mean()
