"""`sdr-export trt`: the gate without TensorRT, everything before the build, and polygraphy's
comparison (its ONNX Runtime runner against our session, tolerances per precision, the report),
tested anywhere.

The engine build itself needs TensorRT and an NVIDIA GPU; that test skips with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures_export import trained_digits, write_digit_pngs

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.model_metadata import ModelMetadata, engine_metadata_path, read_sidecar
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.export.engine_compare import (
    TOLERANCES,
    Batches,
    CompareError,
    compare_runners,
    comparison_inputs,
    make_batches,
    reference_runner,
)
from sdr_edge.export.onnx_export import attach_metadata
from sdr_edge.export.onnx_graph import read_model_graph
from sdr_edge.export.parity import ParityError, raise_on_failure
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.export.quantize import convert_fp16, quantize_int8
from sdr_edge.export.tensorrt_build import (
    BuildOptions,
    EngineBuildError,
    check_tensorrt_compatible,
    engine_metadata,
    prepare_build,
    profile_shapes,
    validate_options,
)
from sdr_edge.inference.cuda_device import (
    find_nvidia_gpu,
    missing_message,
    tensorrt_module,
)
from sdr_edge_export.cli import main as export_main

_TRT, _TRT_ERROR = tensorrt_module()
_GPU, _GPU_NOTE = find_nvidia_gpu()
HAVE_TRT, HAVE_GPU = _TRT is not None, _GPU is not None
SKIP_REASON = missing_message("building an engine", None if HAVE_TRT else _TRT_ERROR,
                              None if HAVE_GPU else _GPU_NOTE)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """An fp32 export, an fp16 conversion, int8 versions quantized for the CPU and for TensorRT."""
    root = tmp_path_factory.mktemp("trt")
    model, spec, _ = trained_digits()
    fp32 = root / "fp32.onnx"
    result = export_model(model, spec, (2, 1), fp32,
                          ExportOptions(eval_source="builtin:digits", eval_limit=100,
                                        progress=False))
    calib = load_source("builtin:digits", spec.image_size, 1, limit=64).images
    x = normalize_batch(calib, spec)
    out = {"fp32": fp32, "meta": result.metadata, "spec": spec}
    fp16_meta = ModelMetadata.from_dict({**result.metadata.to_dict(), "precision": "fp16"})
    out["fp16"] = attach_metadata(convert_fp16(fp32, root / "raw_fp16.onnx"),
                                  root / "fp16.onnx", fp16_meta)
    for target in ("cpu", "tensorrt"):
        raw = root / f"raw_{target}.onnx"
        quantize_int8(fp32, raw, x, "input", target=target, workdir=root)
        meta = ModelMetadata.from_dict({**result.metadata.to_dict(), "precision": "int8"})
        out[f"int8_{target}"] = attach_metadata(raw, root / f"int8_{target}.onnx", meta)
    return out


def _opts(onnx_path: Path, **kw) -> BuildOptions:
    return BuildOptions(onnx=onnx_path, out=onnx_path.with_suffix(".engine"), **kw)


@pytest.mark.skipif(HAVE_TRT and HAVE_GPU, reason="TensorRT and a GPU are present")
def test_without_tensorrt_the_command_stops_at_once_naming_what_is_missing(onnx_models, capsys):
    out = onnx_models["fp32"].with_name("never.engine")
    rc = export_main(["trt", "--onnx", str(onnx_models["fp32"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    if not HAVE_TRT:
        assert "the TensorRT Python package (`import tensorrt` failed" in err
    if not HAVE_GPU:
        assert "an NVIDIA GPU with a working CUDA driver" in err
    assert "pip install 'sdr-edge[trt]'" in err and "JetPack" in err
    assert not out.exists()


def test_missing_message_names_each_missing_part():
    both = missing_message("`sdr-export trt`", "No module named 'tensorrt'", "no device")
    assert both.startswith("`sdr-export trt` needs the TensorRT Python package")
    assert " and an NVIDIA GPU with a working CUDA driver (no device)" in both
    gpu_only = missing_message("x", None, "cuda-python sees no CUDA device")
    assert "TensorRT Python package" not in gpu_only and "NVIDIA GPU" in gpu_only
    trt_only = missing_message("x", "No module named 'tensorrt'", None)
    assert "working CUDA driver" not in trt_only and "sdr-edge[trt]" in trt_only
    assert missing_message("x", None, None) == ""


def test_profile_shapes_defaults_explicit_and_invalid():
    dyn = ("batch", 1, 16, 16)
    p = profile_shapes(dyn, None, None, None)
    assert (p.min, p.opt, p.max) == ((1, 1, 16, 16), (32, 1, 16, 16), (32, 1, 16, 16))
    p = profile_shapes(dyn, 2, 8, 64)
    assert (p.min[0], p.opt[0], p.max[0]) == (2, 8, 64)
    assert profile_shapes(dyn, None, None, 4).opt[0] == 4  # opt follows a small max
    assert profile_shapes(dyn, 40, None, None).max[0] == 40  # max follows a large min
    with pytest.raises(EngineBuildError, match="min <= opt <= max, got min 8, opt 4, max 16"):
        profile_shapes(dyn, 8, 4, 16)
    with pytest.raises(EngineBuildError, match="--min-batch must be >= 1, got 0"):
        profile_shapes(dyn, 0, None, None)
    fixed = (4, 3, 32, 32)
    assert profile_shapes(fixed, None, None, None).to_dict() == {
        "min": [4, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32]}
    with pytest.raises(EngineBuildError, match="fixed batch of 4"):
        profile_shapes(fixed, None, None, 8)


def test_reads_the_onnx_input_and_refuses_cpu_int8(onnx_models):
    info = read_model_graph(onnx_models["fp32"])
    (inp,), (out,) = info.inputs, info.outputs
    assert inp.name == "input" and out.name == "logits"
    assert inp.dims[1:] == (1, 16, 16) and isinstance(inp.dims[0], str)
    assert out.dims[1:] == (10,)
    assert info.metadata.precision == "fp32" and info.metadata == onnx_models["meta"]
    check_tensorrt_compatible(info)
    cpu = read_model_graph(onnx_models["int8_cpu"])
    assert cpu.metadata.precision == "int8" and "uint8" in cpu.activation_quant_types
    with pytest.raises(EngineBuildError, match="--int8-target tensorrt"):
        check_tensorrt_compatible(cpu)
    trt_ready = read_model_graph(onnx_models["int8_tensorrt"])
    assert trt_ready.activation_quant_types == ("int8",)
    check_tensorrt_compatible(trt_ready)


def test_option_checks_need_no_tensorrt(onnx_models, tmp_path):
    fp32 = onnx_models["fp32"]
    info, shapes = prepare_build(_opts(fp32, max_batch=16))
    assert shapes.max[0] == 16 and info.metadata.precision == "fp32"
    for kw, message in [({"hardware_compat": "turing+"}, "unknown --hardware-compat"),
                        ({"workspace_mb": 0}, "--workspace-mb must be >= 1"),
                        ({"sample_inputs": 0}, "at least one sample input"),
                        ({"compare_images": tmp_path / "none"}, "is not a folder")]:
        with pytest.raises(EngineBuildError, match=message):
            validate_options(_opts(fp32, **kw))
    with pytest.raises(EngineBuildError, match="would overwrite an ONNX file"):
        validate_options(BuildOptions(onnx=fp32, out=tmp_path / "x.onnx"))
    with pytest.raises(EngineBuildError, match="ONNX model not found"):
        prepare_build(_opts(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffjunk")
    with pytest.raises(EngineBuildError, match="not a readable ONNX model"):
        prepare_build(_opts(tmp_path / "junk.onnx"))
    with pytest.raises(EngineBuildError, match="--int8-target tensorrt"):
        prepare_build(_opts(onnx_models["int8_cpu"]))
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        prepare_build(_opts(fp32, min_batch=8, max_batch=4))


def test_the_builder_reads_through_the_one_reader_and_keeps_its_error_type(onnx_models,
                                                                          tmp_path):
    two_outputs = onnx.load(str(onnx_models["fp32"]))
    two_outputs.graph.output.extend([two_outputs.graph.output[0]])  # the logits twice
    onnx.save(two_outputs, str(tmp_path / "two.onnx"))
    with pytest.raises(EngineBuildError, match="two.onnx: expected one input and one output, "
                                               "found 1 and 2"):
        prepare_build(_opts(tmp_path / "two.onnx"))
    bare = onnx.load(str(onnx_models["fp32"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(EngineBuildError, match=r"bare\.onnx has no 'sdr_edge' metadata"):
        prepare_build(_opts(tmp_path / "bare.onnx"))


def test_engine_metadata_round_trips(onnx_models, tmp_path):
    opts = _opts(onnx_models["int8_tensorrt"], max_batch=64, version_compatible=True,
                 hardware_compat="ampere+", timing_cache=tmp_path / "cache.bin")
    info, shapes = prepare_build(opts)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "probe": "test"}
    doc = engine_metadata(info, shapes, opts, sha256_file(opts.onnx), "10.9.0", gpu,
                          engine_sha256="ab" * 32, build_seconds=12.3456)
    path = engine_metadata_path(tmp_path / "model.engine")
    assert path.name == "model.engine.json"
    path.write_text(json.dumps(doc))
    meta, back = read_sidecar(path)
    assert meta == onnx_models["meta"].__class__.from_dict(
        {**onnx_models["meta"].to_dict(), "precision": "int8"})
    assert back["onnx"]["sha256"] == sha256_file(onnx_models["int8_tensorrt"])
    assert back["input"]["profile"] == {"min": [1, 1, 16, 16], "opt": [32, 1, 16, 16],
                                        "max": [64, 1, 16, 16]}
    assert back["precision"] == "int8" and back["strongly_typed"] is True
    assert back["version_compatible"] is True and back["hardware_compat"] == "ampere+"
    assert back["gpu"]["compute_capability"] == [9, 0] and back["tensorrt_version"] == "10.9.0"
    assert back["build_seconds"] == 12.346


def _ort(path: Path):
    """polygraphy's own ONNX Runtime runner: the CPU stand-in for the engine."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]),
                        name=f"polygraphy-ort:{path.stem}")


def _ours(path: Path):
    from sdr_edge.inference.runners import OrtRunner

    return reference_runner(OrtRunner(path).session, name=f"ours:{path.stem}")


@pytest.fixture(scope="module")
def digit_batches(onnx_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare_imgs")
    write_digit_pngs(folder, 40, start=900)
    x, where = comparison_inputs(onnx_models["spec"], 36, 0, folder)
    assert x.shape == (36, 1, 16, 16) and where.startswith("36 image(s) from")
    return make_batches(x, 1, 16)


def test_batches_cover_the_profile_and_pad_only_below_its_minimum():
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    b = make_batches(x, 2, 4)
    assert [a.shape[0] for a in b.arrays] == [4, 3, 2] and b.valid == [4, 3, 2]
    b = make_batches(x, 4, 4)  # fixed batch 4: the last chunk padded with its last row
    assert [a.shape[0] for a in b.arrays] == [4, 4] and b.valid == [4, 3] and b.count == 7
    np.testing.assert_array_equal(b.arrays[1][3], x[6])
    with pytest.raises(CompareError, match="at least one input"):
        make_batches(x[:0], 1, 4)


def test_comparison_inputs_from_images_or_noise(onnx_models, tmp_path):
    spec = onnx_models["spec"]
    x, where = comparison_inputs(spec, 5, 3)
    assert x.shape == (5, 1, 16, 16) and x.dtype == np.float32 and "standard normal" in where
    np.testing.assert_array_equal(x, comparison_inputs(spec, 5, 3)[0])  # seeded
    with pytest.raises(CompareError, match="--compare-images: image folder not found"):
        comparison_inputs(spec, 5, 0, tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    with pytest.raises(CompareError, match="no readable image"):
        comparison_inputs(spec, 5, 0, tmp_path / "junk")


@pytest.mark.parametrize("which", ["fp32", "fp16", "int8_tensorrt"])
def test_polygraphy_ort_runner_matches_our_session(onnx_models, digit_batches, which):
    """The production pairing (candidate vs our session on the same ONNX), engine replaced by
    polygraphy's ONNX Runtime runner: same kernels, so every precision passes with ~0 error."""
    path = onnx_models[which]
    precision = which.split("_")[0]
    result = compare_runners(_ort(path), _ours(path), digit_batches, "input", precision,
                             "logits", "polygraphy ORT")
    assert result.passed, [c.describe() for c in result.checks]
    stats = result.report["outputs"]["logits"]
    assert stats["max_absdiff"] <= 1e-5 and stats["iterations"] == 4  # 16 + 16 + 4 + 1
    assert stats["iterations_passed"] == 4 and result.report["inputs"] == 37
    if precision == "int8":
        assert "top-1 agreement 100.00% on 37 inputs" in result.checks[-1].detail


def test_tolerances_are_per_precision(onnx_models, digit_batches):
    """fp16 and int8 ONNX against the fp32 session: each within its own precision's bounds,
    int8 outside fp16's and fp32's; the failing checks name the numbers."""
    ref = onnx_models["fp32"]
    fp16 = compare_runners(_ort(onnx_models["fp16"]), _ours(ref), digit_batches,
                           "input", "fp16", "logits", "fp16 ONNX")
    assert fp16.passed, [c.describe() for c in fp16.checks]
    err = fp16.report["outputs"]["logits"]["max_absdiff"]
    scale = fp16.report["tolerance"]["reference_scale"]
    assert 0 < err < TOLERANCES["fp16"].tol * scale  # fp16 rounding is there, and bounded
    int8 = compare_runners(_ort(onnx_models["int8_tensorrt"]), _ours(ref), digit_batches,
                           "input", "int8", "logits", "int8 ONNX")
    assert int8.passed, [c.describe() for c in int8.checks]
    assert [c.name for c in int8.checks] == [
        "int8 ONNX int8 vs ONNX Runtime (logits, polygraphy mean error)",
        "int8 ONNX int8 vs ONNX Runtime"]
    for precision in ("fp16", "fp32"):
        strict = compare_runners(_ort(onnx_models["int8_tensorrt"]), _ours(ref), digit_batches,
                                 "input", precision, "logits", "int8 ONNX")
        assert not strict.passed and len(strict.checks) == 1
        with pytest.raises(ParityError, match=rf"int8 ONNX {precision} vs ONNX Runtime \(logits, "
                                              r"polygraphy max error\): max \|diff\| = "):
            raise_on_failure("int8 ONNX", strict.checks)
    with pytest.raises(CompareError, match="unknown precision 'bf16'"):
        compare_runners(_ort(ref), _ours(ref), digit_batches, "input", "bf16", "logits", "x")


def test_int8_also_checks_decisions(onnx_models):
    """int8 adds top-1 agreement to polygraphy's error bound: 4 of 8 decisions changed fail it,
    and the check says how many."""
    from polygraphy.backend.base import BaseRunner

    inner = _ours(onnx_models["fp32"])

    class Flipped(BaseRunner):
        """Our session's logits, negated for the first 4 inputs of each batch."""

        def activate_impl(self):
            inner.activate()

        def get_input_metadata_impl(self):
            return inner.get_input_metadata(use_numpy_dtypes=False)

        def infer_impl(self, feed_dict):
            logits = inner.infer(feed_dict)["logits"].copy()
            logits[:4] = -logits[:4]
            self.inference_time = inner.last_inference_time()
            return {"logits": logits}

        def deactivate_impl(self):
            inner.deactivate()

    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    result = compare_runners(Flipped(name="flipped"), _ours(onnx_models["fp32"]),
                             Batches([x], [8]), "input", "int8", "logits", "x")
    agreement = result.checks[-1]
    assert agreement.name == "x int8 vs ONNX Runtime" and not agreement.passed
    assert "4 differ" in agreement.detail and not result.report["passed"]


def test_comparison_report_goes_into_the_engine_metadata(onnx_models, digit_batches, tmp_path):
    path = onnx_models["fp32"]
    result = compare_runners(_ort(path), _ours(path), digit_batches, "input", "fp32", "logits",
                             "polygraphy ORT")
    opts = _opts(path)
    info, shapes = prepare_build(opts)
    gpu = {"name": "test GPU", "compute_capability": [8, 7], "probe": "test"}
    doc = engine_metadata(info, shapes, opts, sha256_file(path), "10.9.0", gpu,
                          checks=[c.to_dict() for c in result.checks],
                          comparison=result.report)
    back = json.loads(json.dumps(doc))  # plain JSON: polygraphy's stats are floats
    report = back["comparison"]
    assert report["tool"] == "polygraphy" and report["passed"] is True
    assert report["tolerance"]["check_error_stat"] == "max"
    assert report["tolerance"]["atol"] == pytest.approx(1e-3 * report["tolerance"]
                                                        ["reference_scale"])
    assert report["runners"] == {"candidate": "polygraphy-ort:fp32", "reference": "ours:fp32"}
    assert report["batches"] == [16, 16, 4, 1] and back["builder"].startswith("polygraphy ")
    assert back["checks"][0]["passed"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and HAVE_GPU), reason=SKIP_REASON)
@pytest.mark.parametrize("which", ["fp32", "int8_tensorrt"])
def test_build_run_and_compare_an_engine(onnx_models, tmp_path, capsys, which):
    from sdr_edge.inference.runners import OrtRunner
    from sdr_edge.inference.trt_runner import TrtRunner
    from sdr_edge_client.cli import main as client_main

    out = tmp_path / f"{which}.engine"
    cache = tmp_path / "timing.cache"
    rc = export_main(["trt", "--onnx", str(onnx_models[which]), "--out", str(out),
                      "--max-batch", "64", "--timing-cache", str(cache)])
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes()[:4] == b"ftrt" and cache.stat().st_size > 0
    meta, doc = read_sidecar(engine_metadata_path(out))
    assert doc["checks"] and all(c["passed"] for c in doc["checks"])
    assert doc["comparison"]["tool"] == "polygraphy" and doc["comparison"]["passed"]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.engine.*"))
    x = np.random.default_rng(1).standard_normal((70, 1, 16, 16)).astype(np.float32)
    runner = TrtRunner(out)
    got, ref = runner.run(x), OrtRunner(onnx_models[which]).run(x)
    runner.close()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    from fixtures_export import write_digit_pngs

    write_digit_pngs(tmp_path / "imgs", 10, start=1700)
    assert client_main(["infer", "--model", str(out), "--images", str(tmp_path / "imgs"),
                        "--no-progress"]) == 0
    assert "TensorRT" in capsys.readouterr().out
