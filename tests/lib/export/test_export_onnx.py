"""`sdr-export onnx`: parity for every precision, pruned bundles, metadata, and refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from fixtures_export import (
    ROUTE,
    SIZE,
    features_model,
    make_bundle,
    make_keys,
    trained_digits,
    write_digit_pngs,
)

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.model_metadata import ModelMetadata, metadata_from_props, read_sidecar
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.export.pipeline import ExportOptions, export_bundle
from sdr_edge.inference.runners import OrtRunner
from sdr_edge_export.cli import main as export_main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, spec, acc = trained_digits()
    assert acc > 0.85, f"the test model did not train ({acc:.2%})"
    key, pub = make_keys(root)
    bundle = make_bundle(root / "bundle", model, spec, key)
    write_digit_pngs(root / "calib", 96, start=1000)  # raw 8x8 files: resized like at inference
    src = load_source("builtin:digits", SIZE, 1)
    held_out = normalize_batch(src.images[1400:], spec), src.labels[1400:]
    return {"root": root, "model": model, "spec": spec, "key": key, "pub": pub,
            "bundle": bundle, "calib": root / "calib", "held_out": held_out}


def _export(env, out, *extra):
    argv = ["onnx", "--bundle", str(env["bundle"]), "--pubkey", str(env["pub"]), "--out",
            str(out), "--no-progress", *extra]
    return export_main(argv)


@pytest.fixture(scope="module")
def exported(env):
    """fp32, fp16 and int8 exports of the trained bundle, made once through the CLI."""
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        path = env["root"] / "models" / f"model_{precision}.onnx"
        rc = _export(env, path, "--precision", precision, "--calib-images", str(env["calib"]),
                     "--eval-source", "builtin:digits", "--eval-limit", "600")
        assert rc == 0
        out[precision] = path
    return out


def _reference(env, x):
    with torch.no_grad():
        return env["model"](torch.from_numpy(x)).numpy()


def test_fp32_is_one_checked_file_with_a_dynamic_batch(env, exported):
    path = exported["fp32"]
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == \
        sorted(f"model_{p}.{ext}" for p in ("fp32", "fp16", "int8") for ext in ("onnx", "json"))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 18
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    x, _ = env["held_out"]
    runner = OrtRunner(path)
    for n in (1, 7, len(x)):
        diff = np.abs(runner.run_batch(x[:n]) - _reference(env, x[:n])).max()
        assert diff <= 1e-4, f"batch {n}: max |diff| {diff}"


def test_fp16_keeps_float32_io_and_meets_its_scaled_bound(env, exported):
    model = onnx.load(str(exported["fp16"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    for vi in (model.graph.input[0], model.graph.output[0]):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x, _ = env["held_out"]
    ref = _reference(env, x)
    got = OrtRunner(exported["fp16"]).run(x)
    assert got.dtype == np.float32
    diff = np.abs(got - ref).max()
    assert 0 < diff <= 5e-3 * max(1.0, np.abs(ref).max())


def test_int8_is_per_channel_qdq_and_keeps_accuracy(env, exported):
    model = onnx.load(str(exported["int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: t for t in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[1] in inits and len(inits[n.input[1]].dims) == 1
                   and inits[n.input[1]].dims[0] > 1]
    assert per_channel, "no per-channel weight scales"
    x, y = env["held_out"]  # images the model never trained on
    ref = _reference(env, x)
    got = OrtRunner(exported["int8"]).run(x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert (ref.argmax(1) == y).mean() - (got.argmax(1) == y).mean() <= 0.01
    sidecar = json.loads(exported["int8"].with_suffix(".json").read_text())
    names = [c["name"] for c in sidecar["checks"]]
    assert names == ["fp32 vs PyTorch (before conversion)", "int8 vs PyTorch", "int8 accuracy"]
    assert all(c["passed"] for c in sidecar["checks"])
    assert sidecar["extra"]["int8"]["activation_type"] == "uint8"
    assert sidecar["extra"]["int8"]["quantized_ops"].get("Conv", 0) >= 5


def test_metadata_round_trips_through_onnx_and_sidecar(env, exported):
    bundle_sha = sha256_file(env["bundle"] / "manifest.json")
    for precision, path in exported.items():
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        embedded = metadata_from_props(props)
        side, doc = read_sidecar(path.with_suffix(".json"))
        assert embedded == side
        assert embedded == ModelMetadata.from_dict(embedded.to_dict())
        assert embedded.input_spec == env["spec"]
        assert embedded.route == ROUTE
        assert embedded.precision == precision
        assert embedded.output_kind == "logits" and embedded.label_names == tuple("0123456789")
        assert embedded.bundle_sha256 == bundle_sha
        assert doc["model_sha256"] == sha256_file(path)
        runner = OrtRunner(path)
        assert runner.metadata == embedded  # what the device reads, without onnx or torch


def test_features_bundle_int8_is_checked_by_cosine(env, tmp_path):
    bundle = make_bundle(tmp_path / "features_bundle", features_model(), env["spec"], env["key"])
    out = tmp_path / "features_int8.onnx"
    opts = ExportOptions(precision="int8", calib_images=env["calib"],
                         eval_source="builtin:digits", eval_limit=300, progress=False)
    result = export_bundle(bundle, load_public_key(env["pub"]), out, opts)
    assert result.metadata.output_kind == "features"
    assert [c.name for c in result.checks][-1] == "int8 vs PyTorch"
    assert "cosine" in result.checks[-1].detail and result.checks[-1].value >= 0.99
    assert any("top-1 agreement is undefined" in n for n in result.notes)
    x, _ = env["held_out"]
    assert OrtRunner(out).run(x[:5]).shape == (5, 32)


def test_pruned_bundle_exports_with_a_fixed_batch(env, tmp_path, capsys):
    from sdr_edge.pruning import prune_bundle

    device_key, device_pub = make_keys(tmp_path, "device")
    pruned = tmp_path / "pruned"
    info = prune_bundle(env["bundle"], load_public_key(env["pub"]), device_key, pruned, 0.6,
                        progress=False)
    assert info["macs_after"] < info["macs_before"]
    out = tmp_path / "pruned.onnx"
    rc = export_main(["onnx", "--bundle", str(pruned), "--pubkey", str(device_pub), "--out",
                      str(out), "--batch", "3", "--eval-source", "builtin:digits",
                      "--eval-limit", "200", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    from sdr_edge.artifacts.bundle import load_bundle

    model = load_bundle(pruned, load_public_key(device_pub)).model
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    original = [m.out_channels for m in env["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(widths) < sum(original)
    onnx_model = onnx.load(str(out))
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    x, _ = env["held_out"]
    runner = OrtRunner(out)
    got = runner.run(x[:10])  # 10 is not a multiple of 3: the last chunk is padded
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:10])).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_failed_parity_fails_with_the_numbers_and_writes_nothing(env, tmp_path, capsys):
    out = tmp_path / "never.onnx"
    rc = _export(env, out, "--eval-source", "builtin:digits", "--eval-limit", "100",
                 "--tolerance", "0")
    err = capsys.readouterr().err
    assert rc == 2
    assert "fp32 vs PyTorch: max |diff| = " in err and "(bound 0, absolute)" in err
    assert "FAILED" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no staging folder


def test_int8_needs_usable_calibration_images(env, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert _export(env, out, "--precision", "int8", "--eval-source", "builtin:digits") == 2
    assert "int8 export needs calibration images" in capsys.readouterr().err
    assert _export(env, out, "--precision", "int8", "--calib-images",
                   str(tmp_path / "missing")) == 2
    assert "calibration image folder not found" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png at all")
    (junk / "b.jpg").write_bytes(b"")
    assert _export(env, out, "--precision", "int8", "--calib-images", str(junk)) == 2
    err = capsys.readouterr().err
    assert "calibration images unusable" in err and "no readable image" in err
    assert not out.exists()


def test_refuses_unverified_bundles_and_missing_inputs(env, tmp_path, capsys):
    _, other_pub = make_keys(tmp_path, "other")
    out = tmp_path / "m.onnx"
    rc = export_main(["onnx", "--bundle", str(env["bundle"]), "--pubkey", str(other_pub),
                      "--out", str(out), "--eval-source", "builtin:digits"])
    assert rc == 2 and "does not verify" in capsys.readouterr().err
    assert _export(env, out) == 2
    assert "checked against PyTorch on real images" in capsys.readouterr().err
    assert _export(env, out, "--eval-source", "builtin:digits", "--opset", "17") == 2
    assert "opset 17 is too old" in capsys.readouterr().err
    assert not out.exists()


def test_int8_checks_allow_one_changed_input_below_their_resolution():
    from sdr_edge.export.parity import accuracy_drop_check, top1_agreement_check

    ref = np.eye(4)[np.arange(94) % 4]
    out = ref.copy()
    out[0] = np.roll(out[0], 1)  # one of 94 predictions flips
    labels = ref.argmax(1)
    assert top1_agreement_check("t", ref, out, 0.99).passed
    assert accuracy_drop_check("a", ref, out, labels, 0.01).passed
    out[1] = np.roll(out[1], 1)  # two flips are more than the resolution allows
    assert not top1_agreement_check("t", ref, out, 0.99).passed
    assert not accuracy_drop_check("a", ref, out, labels, 0.01).passed
    big_ref = np.eye(4)[np.arange(1000) % 4]
    big_out = big_ref.copy()
    big_out[:11] = np.roll(big_out[:11], 1, axis=1)  # 11 of 1000: the 99 % rule itself
    assert not top1_agreement_check("t", big_ref, big_out, 0.99).passed
