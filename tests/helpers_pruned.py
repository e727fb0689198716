"""The budget-pruned federation's settings and bundle check, shared by the in-process test
(tests/lib/federated/test_pruned_federation.py) and the Deployment Engine run on the shared
fleet (tests/lib/federated/test_federation_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.run_dir import load_sdrnet
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.pruning import channel_widths, count_macs_params, example_input

ROUTE = "1,2,0,3"
RATIO = 0.5
LIMIT = 800  # digits per node before the split: one 3-epoch round learns visibly


def run_config(assets: dict[str, Path], out: Path, **extra: object) -> dict:
    return {"run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
            "out-dir": str(out), "route": ROUTE, "num-server-rounds": 1,
            "prune-macs-ratio": RATIO, **extra}


def unpruned(assets: dict[str, Path]) -> tuple[SubnetModel, object]:
    net, spec = load_sdrnet(assets["run_dir"])
    return SubnetModel(net.extract(tuple(int(r) for r in ROUTE.split(","))), 10).eval(), spec


def check_pruned_bundle(assets: dict[str, Path], out: Path) -> tuple[object, dict]:
    """The bundle verifies, is smaller than the routed sub-net by the target, and its
    provenance names the widths it holds."""
    bundle = load_bundle(out / "bundle", load_public_key(assets["pub"]))
    full, spec = unpruned(assets)
    macs_full, _ = count_macs_params(full, example_input(spec))
    macs, _ = count_macs_params(bundle.model, example_input(spec))
    assert macs <= RATIO * macs_full
    pruned = bundle.manifest["provenance"]["federated"]["pruned"]
    assert pruned["target_macs_ratio"] == RATIO and pruned["macs_after"] == macs
    assert pruned["channel_widths"] == channel_widths(bundle.model)
    assert sum(channel_widths(bundle.model).values()) < sum(channel_widths(full).values())
    assert bundle.model.head.out_features == 10  # the head is never pruned
    return bundle, pruned
