"""SDRnet: one backbone whose routed stages hold several expert copies.

A route is a code `(b_1, ..., b_R)`; level r is served by stage `level_stages[r]`, which holds
`branching[r]` experts. A mixed batch is partitioned per expert at each routed stage, so the
cost per image is one sub-net's whatever K is. Levels are activated one by one
(progressive training): before level r is active every image takes expert 0 there.

Codes come in two kinds (`[routing] codes`). Residual codes (the default): digit b_r means the
same at every parent, so stage r holds B_r experts shared by all parents. Tree codes
(hierarchical k-means, `sdr_edge.clustering.tree_kmeans`): b_r refines the parent node, so
stage r holds one expert per tree node, B_1 ... B_r of them, and a route's expert at level r is
its node index (b_1 ... b_r read as a mixed-radix number). Routes, route ids and K are the same.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from sdr_edge.models.resnet import Backbone, BackboneConfig, init_weights, make_stage, make_stem

CODE_KINDS = ("residual", "tree")


def default_level_stages(num_stages: int, levels: int) -> tuple[int, ...]:
    """The deepest stage serves the coarsest level, then one stage shallower per level."""
    if levels > num_stages:
        raise ValueError(f"{levels} routing levels need at least {levels} stages, have {num_stages}")
    return tuple(num_stages - 1 - r for r in range(levels))


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose backward is the inverse gather (autograd's generic index_select backward
    scatters with index_add, which costs more than a gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class RoutedStage(nn.Module):
    """B expert copies of one stage; each keeps its own BatchNorm statistics.

    A mixed batch is sorted by digit once, split into contiguous per-expert chunks, and the
    outputs are put back in the original order: two gathers and one host sync per stage.
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        first = int(digits[0])
        if bool((digits == first).all()):
            return self.experts[first](x)
        order = torch.argsort(digits, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(digits, minlength=len(self.experts)).tolist()
        chunks = _PermuteRows.apply(x, order, inverse).split(counts)
        outs = [self.experts[b](chunk) for b, chunk in enumerate(chunks) if counts[b]]
        return _PermuteRows.apply(torch.cat(outs), inverse, order)


class SDRnet(nn.Module):
    """A backbone with routed stages; `forward(x, codes)` with codes of shape [N, R]."""

    def __init__(self, cfg: BackboneConfig, branching: Sequence[int],
                 level_stages: Sequence[int] | None = None, codes: str = "residual") -> None:
        super().__init__()
        if codes not in CODE_KINDS:
            raise ValueError(f"codes must be one of {CODE_KINDS}, got {codes!r}")
        self.cfg = cfg
        self.codes = codes
        self.branching = tuple(int(b) for b in branching)
        self.level_stages = tuple(level_stages) if level_stages is not None else \
            default_level_stages(cfg.num_stages, len(self.branching))
        if len(self.level_stages) != len(self.branching):
            raise ValueError("level_stages and branching must have one entry per level")
        if len(set(self.level_stages)) != len(self.level_stages):
            raise ValueError("each routed stage can serve one level only")
        if any(not 0 <= s < cfg.num_stages for s in self.level_stages):
            raise ValueError(f"level_stages {self.level_stages} out of range")
        self.stage_level = {s: r for r, s in enumerate(self.level_stages)}
        self.stem = make_stem(cfg)
        stages: list[nn.Module] = []
        for s in range(cfg.num_stages):
            if s in self.stage_level:
                b = self.expert_counts[self.stage_level[s]]
                base = make_stage(cfg, s)
                stages.append(RoutedStage([copy.deepcopy(base) for _ in range(b)]))
            else:
                stages.append(make_stage(cfg, s))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.register_buffer("active_levels", torch.zeros((), dtype=torch.long))
        init_weights(self)

    @property
    def levels(self) -> int:
        return len(self.branching)

    @property
    def num_subnets(self) -> int:
        k = 1
        for b in self.branching:
            k *= b
        return k

    @property
    def expert_counts(self) -> tuple[int, ...]:
        """Experts of each level's stage: B_r (residual codes) or B_1 ... B_r (tree codes)."""
        if self.codes == "residual":
            return self.branching
        counts, total = [], 1
        for b in self.branching:
            total *= b
            counts.append(total)
        return tuple(counts)

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def arch_dict(self) -> dict:
        """What rebuilds the net; `codes` is recorded only for tree codes, so that a residual
        run's architecture (and every file that embeds it) reads as before tree codes existed."""
        d = {"backbone": self.cfg.to_dict(), "branching": list(self.branching),
             "level_stages": list(self.level_stages)}
        if self.codes != "residual":
            d["codes"] = self.codes
        return d

    @classmethod
    def from_arch_dict(cls, d: dict) -> SDRnet:
        return cls(BackboneConfig.from_dict(d["backbone"]), d["branching"], d["level_stages"],
                   d.get("codes", "residual"))

    @classmethod
    def from_backbone(cls, backbone: Backbone, branching: Sequence[int],
                      level_stages: Sequence[int] | None = None,
                      codes: str = "residual") -> SDRnet:
        """An SDRnet whose every expert starts as a copy of `backbone`'s stage."""
        net = cls(backbone.cfg, branching, level_stages, codes)
        net.stem.load_state_dict(backbone.stem.state_dict())
        for s, stage in enumerate(net.stages):
            src = backbone.stages[s].state_dict()
            if isinstance(stage, RoutedStage):
                for expert in stage.experts:
                    expert.load_state_dict(src)
            else:
                stage.load_state_dict(src)
        return net

    def split_level(self, level: int) -> None:
        """Activate `level`: its experts start from expert 0's (the trained shared) weights."""
        if level != int(self.active_levels):
            raise ValueError(f"levels activate in order: next is {int(self.active_levels)}, got {level}")
        stage = self.stages[self.level_stages[level]]
        src = stage.experts[0].state_dict()
        for expert in stage.experts[1:]:
            expert.load_state_dict(src)
        self.active_levels.fill_(level + 1)

    def effective_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes with digits of not-yet-active levels set to 0."""
        codes = codes.to(torch.long)
        active = int(self.active_levels)
        if active >= self.levels:
            return codes
        codes = codes.clone()
        codes[:, active:] = 0
        return codes

    def expert_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Expert of every level's stage per image [N, R]: the effective digit (residual codes)
        or the effective node index (tree codes; an inactive level takes expert 0)."""
        codes = self.effective_codes(codes)
        if self.codes == "residual":
            return codes
        nodes = torch.zeros_like(codes)
        prev = torch.zeros_like(codes[:, 0])
        for r, b in enumerate(self.branching[:int(self.active_levels)]):
            prev = prev * b + codes[:, r]
            nodes[:, r] = prev
        return nodes

    def check_codes(self, codes: torch.Tensor, n: int) -> None:
        if codes.shape != (n, self.levels):
            raise ValueError(f"codes must have shape [{n}, {self.levels}], got {tuple(codes.shape)}")
        limits = torch.tensor(self.branching, device=codes.device)
        if bool(((codes < 0) | (codes >= limits)).any()):
            raise ValueError(f"code digits out of range for branching {self.branching}")

    def forward(self, x: torch.Tensor, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            codes = torch.tensor([list(codes)] * x.shape[0], device=x.device)
        elif codes.ndim == 1:
            codes = codes[None, :].expand(x.shape[0], -1)
        self.check_codes(codes, x.shape[0])
        experts = self.expert_indices(codes)
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            if isinstance(stage, RoutedStage):
                x = stage(x, experts[:, self.stage_level[s]])
            else:
                x = stage(x)
        return torch.flatten(self.pool(x), 1)

    def extract(self, route: Sequence[int]) -> Backbone:
        """The plain backbone holding route's experts (inactive levels take expert 0)."""
        route = [int(v) for v in route]
        codes = self.effective_codes(torch.tensor([route]))
        self.check_codes(codes, 1)
        experts = self.expert_indices(codes)
        net = Backbone(self.cfg)
        net.stem.load_state_dict(self.stem.state_dict())
        for s, stage in enumerate(self.stages):
            if isinstance(stage, RoutedStage):
                chosen = stage.experts[int(experts[0, self.stage_level[s]])]
                net.stages[s].load_state_dict(chosen.state_dict())
            else:
                net.stages[s].load_state_dict(stage.state_dict())
        return net.train(self.training)

    def all_routes(self) -> list[tuple[int, ...]]:
        """Every route, in lexicographic order (K of them)."""
        routes: list[tuple[int, ...]] = [()]
        for b in self.branching:
            routes = [r + (d,) for r in routes for d in range(b)]
        return routes
