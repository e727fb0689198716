"""`sdr-export onnx --raw-input`: uint8 NHWC in, normalised in the graph, same outputs as today's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fixtures_export import SIZE, make_bundle, make_keys, trained_digits, write_digit_pngs

from sdr_edge.artifacts.model_metadata import read_sidecar
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.inference.base import NORMALIZED_NCHW, RAW_NHWC
from sdr_edge.inference.predict import load_for_model
from sdr_edge.inference.runners import OrtRunner
from sdr_edge_client.cli import main as client_main
from sdr_edge_export.cli import main as export_main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Today's fp32 graph, its raw-input twin, and a raw-input int8 graph, made by the CLI."""
    root = tmp_path_factory.mktemp("raw")
    model, spec, _ = trained_digits()
    key, pub = make_keys(root)
    bundle = make_bundle(root / "bundle", model, spec, key)
    write_digit_pngs(root / "calib", 64, start=1000)
    out = {"root": root, "spec": spec}
    for name, extra in {"fp32": [], "raw": ["--raw-input"],
                        "raw_int8": ["--raw-input", "--precision", "int8", "--calib-images",
                                     str(root / "calib")]}.items():
        path = root / f"{name}.onnx"
        rc = export_main(["onnx", "--bundle", str(bundle), "--pubkey", str(pub), "--out",
                          str(path), "--no-progress", "--eval-source", "builtin:digits",
                          "--eval-limit", "300", *extra])
        assert rc == 0
        out[name] = path
    # Real images a device would hold (never trained on), decoded and sized as at inference.
    files = write_digit_pngs(root / "device", 40, start=1500, size=24)
    out["files"] = files
    out["uint8"] = np.stack([load_for_model(f, spec)[0] for f in files])
    return out


def test_the_raw_graph_takes_uint8_nhwc_and_normalises_inside(models):
    graph = onnx.load(str(models["raw"])).graph
    (inp,) = graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [SIZE, SIZE, 1] and isinstance(dims[0], str)  # batch stays dynamic
    assert [n.op_type for n in graph.node[:5]] == ["Cast", "Div", "Sub", "Div", "Transpose"]
    meta, doc = read_sidecar(models["raw"].with_suffix(".json"))
    assert meta.extra["input_layout"] == RAW_NHWC
    assert read_sidecar(models["fp32"].with_suffix(".json"))[0].extra["input_layout"] \
        == NORMALIZED_NCHW
    raw_check = next(c for c in doc["checks"] if c["name"].startswith("raw-input"))
    assert raw_check["passed"] and raw_check["bound"] == 1e-5
    assert OrtRunner(models["raw"]).metadata.extra["input_layout"] == RAW_NHWC


def test_raw_graph_matches_todays_graph_on_real_images(models):
    spec, images = models["spec"], models["uint8"]
    today = OrtRunner(models["fp32"]).run(normalize_batch(images, spec))
    raw = OrtRunner(models["raw"]).run(images)
    assert np.abs(raw - today).max() <= 1e-5
    assert (raw.argmax(1) == today.argmax(1)).all()


def test_int8_raw_graph_is_quantized_and_agrees(models):
    meta, doc = read_sidecar(models["raw_int8"].with_suffix(".json"))
    assert meta.precision == "int8" and meta.extra["input_layout"] == RAW_NHWC
    assert meta.extra["int8"]["quantized_ops"].get("Conv", 0) >= 5
    ops = {n.op_type for n in onnx.load(str(models["raw_int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Cast", "Transpose"} <= ops
    today = OrtRunner(models["fp32"]).run(normalize_batch(models["uint8"], models["spec"]))
    int8 = OrtRunner(models["raw_int8"]).run(models["uint8"])
    assert (int8.argmax(1) == today.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["raw", "raw_int8"])
def test_infer_feeds_a_raw_graph_directly(models, name, capsys):
    folder = models["files"][0].parent

    def infer(model):
        assert client_main(["infer", "--model", str(model), "--images", str(folder),
                            "--json", "--batch", "16"]) == 0
        return json.loads(capsys.readouterr().out)

    raw, today = infer(models[name]), infer(models["fp32"])
    assert raw["input_layout"] == RAW_NHWC and today["input_layout"] == NORMALIZED_NCHW
    assert "uint8 NHWC input" in raw["runtime"]
    assert len(raw["predictions"]) == len(models["files"])
    same = [a["label"] == b["label"] for a, b in zip(raw["predictions"], today["predictions"],
                                                     strict=True)]
    if name == "raw":  # same graph behind the preprocessing: same labels and scores
        assert all(same)
        assert max(abs(a["score"] - b["score"]) for a, b in
                   zip(raw["predictions"], today["predictions"], strict=True)) <= 1e-5
    else:
        assert np.mean(same) >= 0.95
    correct = [p["label"] == f.stem[-1] for p, f in zip(raw["predictions"], models["files"],
                                                        strict=True)]
    assert np.mean(correct) >= 0.8
