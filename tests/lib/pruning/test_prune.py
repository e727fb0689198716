"""Pruning a bundle to a MACs budget: target met within one step, exact round trip, signing chain."""

from __future__ import annotations

import json

import pytest
import torch

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.bundle import BundleError, load_bundle, verify_bundle, write_bundle
from sdr_edge.artifacts.signing import generate_keypair, load_private_key, load_public_key, verify
from sdr_edge.data import InputSpec
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel
from sdr_edge.pruning import (
    PruningError,
    channel_widths,
    count_macs_params,
    example_input,
    prune_bundle,
    prune_to_macs,
)

SPEC = InputSpec(16, 1, (0.3,), (0.3,), tuple("0123456789"))


def _model(block: str = "basic", num_classes: int | None = 10) -> SubnetModel:
    torch.manual_seed(0)
    cfg = BackboneConfig.preset("small", in_channels=1, block=block,
                                widths=(8, 16, 32, 32) if block == "basic" else (4, 8, 8, 16))
    return SubnetModel(Backbone(cfg), num_classes).eval()


@pytest.fixture
def keys(keypair):
    server_key, server_pub, tmp = keypair
    generate_keypair(tmp / "device.key", tmp / "device.pub")
    return server_key, server_pub, load_private_key(tmp / "device.key"), tmp


@pytest.mark.parametrize(("block", "num_classes"), [("basic", 10), ("bottleneck", None)])
def test_prune_meets_target_within_one_step(block, num_classes):
    model = _model(block, num_classes)
    res = prune_to_macs(model, SPEC, 0.5, max_steps=20, progress=False)
    assert res.macs_after <= 0.5 * res.macs_before
    previous = res.history[-2]["macs"] if len(res.history) > 1 else res.macs_before
    assert previous > 0.5 * res.macs_before  # stopped at the first step under the target
    assert res.params_after < res.params_before
    assert (res.macs_after, res.params_after) == count_macs_params(res.model,
                                                                   example_input(SPEC))
    widths = channel_widths(res.model)
    out = res.model(torch.randn(2, 1, 16, 16))
    if num_classes:
        assert widths["head"] == num_classes and out.shape == (2, num_classes)
    # the feature dimension (residual output of the last stage) is kept
    assert res.model.head is not None or out.shape == (2, model.backbone.feature_dim)
    assert sum(widths.values()) < sum(channel_widths(model).values())
    # the original model is untouched
    assert channel_widths(model) == channel_widths(_model(block, num_classes))


def test_unreachable_target_and_bad_ratio():
    with pytest.raises(PruningError, match="not reached"):
        prune_to_macs(_model(), SPEC, 0.01, max_steps=2, max_channel_ratio=0.1, progress=False)
    with pytest.raises(PruningError, match="macs-ratio"):
        prune_to_macs(_model(), SPEC, 1.5, progress=False)


def test_bundle_round_trip_is_exact_and_signed_by_the_device(keys, tmp_path):
    server_key, server_pub, device_key, _ = keys
    model = _model()
    parent = write_bundle(model, tmp_path / "parent", (1, 0), SPEC, server_key, {"run": "t"})
    out = tmp_path / "pruned"
    summary = prune_bundle(parent, server_pub, device_key, out, 0.5, progress=False)
    assert summary["parity_exact"] and summary["macs_after"] <= 0.5 * summary["macs_before"]

    loaded = load_bundle(out, device_key.public_key())
    assert loaded.route == (1, 0)
    res = prune_to_macs(model, SPEC, 0.5, progress=False)  # deterministic: same pruned model
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), res.model(x))
    assert channel_widths(loaded.model) == summary["channel_widths"]

    manifest = loaded.manifest
    pruned = manifest["provenance"]["pruned"]
    assert pruned["channel_widths"] == summary["channel_widths"]
    assert pruned["macs_before"] == summary["macs_before"]
    assert manifest["provenance"]["parent_manifest_sha256"] == sha256_file(parent / "manifest.json")
    # the chain back to the server: the parent's manifest and signature travel along
    verify(server_pub, (out / "parent_manifest.json").read_bytes(),
           (out / "parent_manifest.sig").read_bytes())
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(out, server_pub)  # signed by the device, not the server


def test_tampered_parent_is_refused_and_nothing_written(keys, tmp_path):
    server_key, server_pub, device_key, _ = keys
    parent = write_bundle(_model(), tmp_path / "parent", (0, 0), SPEC, server_key)
    weights = parent / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        prune_bundle(parent, server_pub, device_key, tmp_path / "out", 0.5, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli(keys, tmp_path, capsys):
    from sdr_edge_client.cli import main

    server_key, _, _, keydir = keys
    parent = write_bundle(_model(), tmp_path / "parent", (0, 1), SPEC, server_key)
    args = ["prune", "--bundle", str(parent), "--pubkey", str(keydir / "server.pub"),
            "--key", str(keydir / "device.key"), "--out", str(tmp_path / "small")]
    assert main([*args, "--macs-ratio", "0.6"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["macs_after"] <= 0.6 * summary["macs_before"]
    assert summary["params_after"] < summary["params_before"]
    load_bundle(tmp_path / "small", load_public_key(keydir / "device.pub"))
    assert main([*args, "--macs-ratio", "0"]) == 2
    assert "macs-ratio" in capsys.readouterr().err
    wrong = [*args[:3], "--pubkey", str(keydir / "device.pub"), *args[5:]]
    assert main(wrong) == 2
    assert "does not verify" in capsys.readouterr().err
