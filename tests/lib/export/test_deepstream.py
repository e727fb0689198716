"""`sdr-export deepstream`: the nvinfer config read back with configparser matches the model key
by key; net-scale-factor and offsets reproduce the model's own normalisation on pixel values."""

from __future__ import annotations

import configparser
import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fixtures_export import ROUTE, SIZE, trained_digits

from sdr_edge.artifacts.model_metadata import metadata_from_props
from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.export.onnx_export import attach_metadata
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.export.quantize import quantize_int8
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel
from sdr_edge_export.cli import main as export_main

PIXELS = np.array([0, 1, 17, 77, 128, 200, 254, 255], np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained 1-channel digits classifier; an untrained 3-channel one (one std), and a
    copy of it whose metadata says per-channel stds."""
    root = tmp_path_factory.mktemp("deepstream")
    model, spec, _ = trained_digits()
    opts = ExportOptions(eval_source="builtin:digits", eval_limit=64, progress=False)
    gray = export_model(model, spec, ROUTE, root / "gray.onnx", opts).path
    torch.manual_seed(0)
    cfg = BackboneConfig.preset("small", in_channels=3, widths=(8, 8, 8, 8), stem_width=8)
    spec3 = InputSpec(SIZE, 3, (0.40, 0.45, 0.50), (0.25, 0.25, 0.25), ("a", "b", "c", "d"))
    color = export_model(SubnetModel(Backbone(cfg), 4).eval(), spec3, ROUTE, root / "bgr.onnx",
                         ExportOptions(calib_source="builtin:digits", calib_limit=16,
                                       progress=False)).path
    meta = _metadata(color)
    per_channel = dataclasses.replace(
        meta, input_spec=dataclasses.replace(spec3, std=(0.229, 0.224, 0.225)))
    std3 = attach_metadata(color, root / "std3.onnx", per_channel)
    return {"gray": gray, "bgr": color, "std3": std3}


def _metadata(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return metadata_from_props(session.get_modelmeta().custom_metadata_map)


def _export(onnx_path, out, *extra):
    return export_main(["deepstream", "--onnx", str(onnx_path), "--out", str(out), *extra])


def _read(folder):
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    assert cp.read(folder / "config_infer.txt") == [str(folder / "config_infer.txt")]
    assert cp.sections() == ["property"]
    return cp["property"]


def _nvinfer(prop, pixels, channels):
    """nvinfer's preprocessing: y = net-scale-factor * (x - offsets[c])."""
    offsets = [float(v) for v in prop["offsets"].split(";")]
    assert len(offsets) == channels
    return float(prop["net-scale-factor"]) * (pixels[:, None].astype(np.float64)
                                             - np.asarray(offsets))


def _model_normalisation(spec, pixels):
    """sdr-edge's own preprocessing (what the model was trained and checked with)."""
    images = np.repeat(pixels[:, None, None, None], spec.channels, axis=3)  # N x 1 x 1 x C
    flat = dataclasses.replace(spec, image_size=1)
    return normalize_batch(images, flat)[:, :, 0, 0].astype(np.float64)


def test_gray_classifier_config_key_by_key(models, tmp_path):
    out = tmp_path / "ds"
    assert _export(models["gray"], out, "--batch", "4") == 0
    prop = _read(out)
    meta = _metadata(models["gray"])
    spec = meta.input_spec
    assert prop["onnx-file"] == "model.onnx" and (out / prop["onnx-file"]).is_file()
    assert prop["model-engine-file"] == "model.onnx_b4_gpu0_fp32.engine"
    assert (prop["network-mode"], prop["batch-size"], prop["network-type"]) == ("0", "4", "1")
    assert prop["model-color-format"] == "2"  # GRAY
    assert prop["infer-dims"] == f"1;{SIZE};{SIZE}"
    assert prop["network-input-order"] == "0"
    assert (prop["gie-unique-id"], prop["process-mode"], prop["gpu-id"]) == ("1", "1", "0")
    assert float(prop["classifier-threshold"]) == 0.5
    labels = (out / prop["labelfile-path"]).read_text().splitlines()
    assert labels == [";".join(meta.label_names)]
    got = _nvinfer(prop, PIXELS, 1)
    np.testing.assert_allclose(got, _model_normalisation(spec, PIXELS), rtol=0, atol=1e-5)
    # the shipped graph: its output is the named blob, and it is softmax(the exported logits)
    shipped = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in shipped.get_outputs()] == [prop["output-blob-names"]]
    x = np.random.default_rng(0).normal(size=(4, 1, SIZE, SIZE)).astype(np.float32)
    logits = ort.InferenceSession(str(models["gray"]), providers=["CPUExecutionProvider"]
                                  ).run(None, {"input": x})[0]
    probs = shipped.run(None, {"input": x})[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-6)


def test_bgr_model_offsets_per_channel_and_fp16_mode(models, tmp_path):
    out = tmp_path / "ds"
    assert _export(models["bgr"], out, "--precision", "fp16", "--process-mode", "secondary",
                   "--gie-id", "3") == 0
    prop = _read(out)
    spec = _metadata(models["bgr"]).input_spec
    assert prop["model-color-format"] == "1"  # BGR: OpenCV decodes what the model trained on
    assert (prop["network-mode"], prop["infer-dims"]) == ("2", f"3;{SIZE};{SIZE}")
    assert (prop["process-mode"], prop["gie-unique-id"]) == ("2", "3")
    assert prop["model-engine-file"].endswith("_b1_gpu0_fp16.engine")
    np.testing.assert_allclose(_nvinfer(prop, PIXELS, 3), _model_normalisation(spec, PIXELS),
                               rtol=0, atol=1e-5)
    assert "APPROXIMATE" not in (out / "config_infer.txt").read_text()


def test_per_channel_std_is_refused_unless_the_error_is_accepted(models, tmp_path, capsys):
    out = tmp_path / "ds"
    assert _export(models["std3"], out) == 2
    err = capsys.readouterr().err
    assert "one net-scale-factor for all channels" in err and "--max-scale-error" in err
    assert not out.exists()
    bound = (0.229 - 0.224) / (0.229 + 0.224)  # the minimax scale's worst relative error
    assert _export(models["std3"], out, "--max-scale-error", "0.012") == 0
    text = (out / "config_infer.txt").read_text()
    assert f"{bound:.4%}" in text and "APPROXIMATE" in text
    prop = _read(out)
    spec = _metadata(models["std3"]).input_spec
    got, want = _nvinfer(prop, PIXELS, 3), _model_normalisation(spec, PIXELS)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-9)
    assert rel[np.abs(want) > 1e-3].max() <= bound + 1e-6  # no worse than the recorded bound
    assert rel.max() > bound / 2  # and really approximate: the comment is not decoration


def test_refusals_and_replacement(models, tmp_path, capsys):
    out = tmp_path / "ds"
    assert _export(models["gray"], out, "--precision", "int8") == 2
    assert "--int8-target tensorrt" in capsys.readouterr().err
    assert _export(models["gray"], out, "--batch", "0") == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert not out.exists()
    assert _export(models["gray"], out) == 0
    assert _export(models["gray"], out, "--batch", "2") == 0  # our own output is replaced
    assert _read(out)["batch-size"] == "2"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert _export(models["gray"], foreign) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_int8_mode_follows_the_graph_not_the_metadata(models, tmp_path, capsys):
    """A TensorRT-ready Q/DQ graph gets network-mode 1; a CPU (uint8) one is refused even when
    its metadata is edited to claim the TensorRT target, as the engine builder refuses it."""
    meta = _metadata(models["gray"])
    x = normalize_batch(load_source("builtin:digits", SIZE, 1, limit=32).images,
                        meta.input_spec)
    made = {}
    for target in ("tensorrt", "cpu"):
        raw = tmp_path / f"raw_{target}.onnx"
        quantize_int8(models["gray"], raw, x, "input", target=target, workdir=tmp_path)
        int8 = dataclasses.replace(meta, precision="int8", extra={})  # no target recorded
        made[target] = attach_metadata(raw, tmp_path / f"{target}.onnx", int8)
    assert _export(made["tensorrt"], tmp_path / "trt") == 0
    assert _read(tmp_path / "trt")["network-mode"] == "1"
    assert _export(made["tensorrt"], tmp_path / "fp16", "--precision", "fp16") == 2
    assert "network-mode int8 only" in capsys.readouterr().err
    claims_trt = dataclasses.replace(meta, precision="int8", extra={"int8": {"target": "tensorrt"}})
    lying = attach_metadata(made["cpu"], tmp_path / "lying.onnx", claims_trt)
    assert _metadata(lying).extra["int8"]["target"] == "tensorrt"
    assert _export(lying, tmp_path / "cpu") == 2
    assert "int8 for ONNX Runtime on CPUs" in capsys.readouterr().err
    assert not (tmp_path / "cpu").exists()
