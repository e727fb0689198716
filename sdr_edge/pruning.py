"""Structural pruning of a sub-net to a device's MACs budget (torch-pruning), as a signed bundle.

How it prunes. `tp.pruner.BasePruner` with `GroupMagnitudeImportance` (L2 norm over each
dependency group, so coupled channels of residual connections go together) removes channels
in small iterative steps (uniform ratio per group, linear schedule up to `max_channel_ratio`)
and MACs are counted after every step; it stops at the first step whose MACs are at or below
`macs_ratio` x the original, so the target is never overshot by more than one step. The head
and the feature dimension (the last stage's residual output) are never pruned, so a pruned
bundle keeps the same head and the same feature interface as its parent.

Who signs. A device cannot sign with the server's key. The parent bundle must verify under the
server's public key; the pruned bundle is then signed with the *device's* Ed25519 key
(`sdr-server keygen` makes one) and carries the parent's `manifest.json` and `manifest.sig` as
`parent_manifest.json` / `parent_manifest.sig`, with the parent manifest's sha256 in its
provenance: whoever trusts the device key verifies the pruned bundle with it, and can check
the chain back to the server's signature with the server key.

How it loads back. The manifest keeps the parent's architecture; the pruned widths are the
tensor shapes in weights.safetensors (`bundle.fit_modules_to_state` rebuilds the layers from
them) and are also listed under provenance["pruned"]["channel_widths"].
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn
from tqdm import tqdm

from sdr_edge.artifacts.atomic import sha256_bytes
from sdr_edge.artifacts.bundle import (
    MANIFEST,
    SIGNATURE,
    load_bundle,
    load_bundle_and_files,
    write_bundle_files,
)
from sdr_edge.artifacts.staging import OutputError, check_replaceable_dir, resolve_out, staged_dir
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.errors import SdrEdgeError
from sdr_edge.models.classifier import SubnetModel

log = logging.getLogger(__name__)

PRUNE_METHOD = "torch-pruning BasePruner, GroupMagnitudeImportance(p=2)"
PARENT_MANIFEST = "parent_manifest.json"
PARENT_SIGNATURE = "parent_manifest.sig"


class PruningError(SdrEdgeError, ValueError):
    """The MACs target cannot be met, or the pruned bundle does not load back exactly."""


@dataclass
class PruneResult:
    """The pruned model and what it cost/saved."""

    model: SubnetModel
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int
    history: list[dict] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def summary(self) -> dict:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_ratio": round(self.macs_ratio, 6), "steps": self.steps,
                "channel_widths": channel_widths(self.model)}


def example_input(spec: InputSpec) -> torch.Tensor:
    return torch.randn(1, spec.channels, spec.image_size, spec.image_size)


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs per image and parameter count (tp.utils.count_ops_and_params)."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Conv2d and Linear layer, by module name."""
    return {name: int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def protected_layers(model: SubnetModel) -> list[nn.Module]:
    """The head and the layer producing the feature vector (keeps the residual stream's width)."""
    last_block = model.backbone.stages[-1][-1]
    last_conv = getattr(last_block, "conv3", None) or last_block.conv2
    layers: list[nn.Module] = [last_conv]
    if model.head is not None:
        layers.append(model.head)
    return layers


def prune_to_macs(model: SubnetModel, spec: InputSpec, macs_ratio: float, *,
                  max_steps: int = 20, max_channel_ratio: float = 0.9,
                  progress: bool = True) -> PruneResult:
    """Prune a copy of `model` until MACs <= macs_ratio x MACs before (see module docstring)."""
    if not 0.0 < macs_ratio < 1.0:
        raise PruningError(f"--macs-ratio must be in (0, 1), got {macs_ratio}")
    if max_steps < 1 or not 0.0 < max_channel_ratio < 1.0:
        raise PruningError("max_steps must be >= 1 and max_channel_ratio in (0, 1)")
    model = copy.deepcopy(model).eval()
    example = example_input(spec)
    macs_before, params_before = count_macs_params(model, example)
    target = macs_ratio * macs_before
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=max_channel_ratio, iterative_steps=max_steps,
        ignored_layers=protected_layers(model))
    macs, params = macs_before, params_before
    history: list[dict] = []
    bar = tqdm(range(max_steps), desc="pruning", disable=not progress, leave=False)
    step = 0
    for step in bar:
        pruner.step()
        macs, params = count_macs_params(model, example)
        history.append({"step": step + 1, "macs": macs, "params": params})
        bar.set_postfix(macs_ratio=f"{macs / macs_before:.3f}")
        if macs <= target:
            break
    bar.close()
    if macs > target:
        raise PruningError(f"MACs target {macs_ratio} not reached: {macs / macs_before:.3f} "
                           f"after {max_steps} steps at up to {max_channel_ratio:.0%} of the "
                           "channels (the head and feature layer are kept)")
    return PruneResult(model.eval(), macs_before, macs, params_before, params, step + 1, history)


def prune_bundle(bundle_dir: str | Path, server_pubkey: Ed25519PublicKey,
                 device_key: Ed25519PrivateKey, out_dir: str | Path, macs_ratio: float, *,
                 max_steps: int = 20, max_channel_ratio: float = 0.9,
                 progress: bool = True) -> dict:
    """Verify a server-signed bundle, prune it, write a device-signed bundle; return the figures.

    The staged bundle is loaded back and its outputs compared with the in-memory pruned
    model with torch.equal; a mismatch raises PruningError and nothing is published. An
    existing `out_dir` must be empty or an earlier bundle (see artifacts.staging).
    """
    bundle_dir = Path(bundle_dir)
    out_dir = resolve_out(out_dir)
    check_replaceable_dir(out_dir)  # refuse a foreign --out before minutes of pruning
    if out_dir.resolve() == bundle_dir.resolve():
        raise OutputError(f"{out_dir}: the pruned bundle cannot replace its parent bundle")
    parent, parent_files = load_bundle_and_files(bundle_dir, server_pubkey)
    result = prune_to_macs(parent.model, parent.input_spec, macs_ratio, max_steps=max_steps,
                           max_channel_ratio=max_channel_ratio, progress=progress)
    parent_manifest = parent_files[MANIFEST]
    provenance = {
        "created_by": "sdr-client prune",
        "signed_by": "device",
        "parent_manifest_sha256": sha256_bytes(parent_manifest),
        "parent_provenance": parent.manifest.get("provenance", {}),
        "pruned": {**result.summary(), "target_macs_ratio": macs_ratio,
                   "method": PRUNE_METHOD},
    }
    extra = {PARENT_MANIFEST: parent_manifest, PARENT_SIGNATURE: parent_files[SIGNATURE]}
    with staged_dir(out_dir) as staging:  # checked in staging: a mismatch publishes nothing
        write_bundle_files(result.model, staging, parent.route, parent.input_spec, device_key,
                           provenance=provenance, extra_files=extra)
        loaded = load_bundle(staging, device_key.public_key())
        x = torch.randn(4, *example_input(parent.input_spec).shape[1:])
        with torch.no_grad():
            same = torch.equal(loaded.model(x), result.model(x))
        if not same:
            raise PruningError("the pruned bundle does not reproduce the pruned model exactly")
    return {"bundle": str(out_dir), "route": list(parent.route), **result.summary(),
            "target_macs_ratio": macs_ratio, "parity_exact": True}
