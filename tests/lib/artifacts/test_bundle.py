import pytest
import torch

from sdr_edge.artifacts.bundle import BundleError, load_bundle, write_bundle
from sdr_edge.data import InputSpec
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel

SPEC = InputSpec(16, 1, (0.3,), (0.3,), tuple("0123456789"))


def _bundle(tmp_path, keypair):
    key, pub, _ = keypair
    model = SubnetModel(Backbone(BackboneConfig.preset("small", in_channels=1)), 10).eval()
    out = write_bundle(model, tmp_path / "bundle", (1, 0, 2, 3), SPEC, key, {"run": "test"})
    return model, out, pub


def test_round_trip_is_exact(tmp_path, keypair):
    model, out, pub = _bundle(tmp_path, keypair)
    bundle = load_bundle(out, pub)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(bundle.model(x), model(x))
    assert bundle.route == (1, 0, 2, 3)
    assert bundle.input_spec == SPEC


def test_flipped_byte_is_refused(tmp_path, keypair):
    _, out, pub = _bundle(tmp_path, keypair)
    weights = out / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(out, pub)


def test_edited_manifest_or_missing_signature_is_refused(tmp_path, keypair):
    _, out, pub = _bundle(tmp_path, keypair)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"route": [\n    1', '"route": [\n    2'))
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(out, pub)
    (out / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="unsigned"):
        load_bundle(out, pub)
