"""Execution providers: the ordered fallback, the provider the session took, and layouts."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdr_edge.artifacts.model_metadata import METADATA_KEY, ModelMetadata
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.inference.base import NORMALIZED_NCHW, RAW_NHWC, model_input
from sdr_edge.inference.model_file import ModelFileError
from sdr_edge.inference.providers import (
    CPU,
    CUDA,
    TENSORRT,
    ProviderError,
    choose_providers,
    fallback_warning,
)
from sdr_edge.inference.runners import OrtRunner, open_runner

SPEC = InputSpec(4, 1, (0.5,), (0.25,), ("a", "b", "c"))
GPU_PROVIDERS = {CUDA, TENSORRT} & set(ort.get_available_providers())


def tiny_onnx(path, extra: dict | None = None) -> str:
    """Flatten + Gemm on 1 x 4 x 4 float input, with sdr-edge metadata (no torch needed)."""
    w = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = ModelMetadata(SPEC, (0,), "fp32", "logits", extra=extra or {})
    model.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
    onnx.save(model, str(path))
    return str(path)


def test_each_request_falls_back_in_order_and_warns_naming_the_missing_provider():
    cpu_only = [CPU]
    assert choose_providers("cpu", cpu_only).providers == (CPU,)
    assert choose_providers("cpu", cpu_only).warnings == ()
    cuda = choose_providers("CUDA", cpu_only)  # case does not matter
    assert cuda.providers == (CPU,)
    assert len(cuda.warnings) == 1 and CUDA in cuda.warnings[0] and "falling back to " + CPU \
        in cuda.warnings[0]
    trt = choose_providers("tensorrt", [CUDA, CPU])
    assert trt.providers == (CUDA, CPU)
    assert len(trt.warnings) == 1 and TENSORRT in trt.warnings[0] and CUDA in trt.warnings[0]
    assert len(choose_providers("tensorrt", cpu_only).warnings) == 2
    assert choose_providers("tensorrt", [TENSORRT, CUDA, CPU]).providers == (TENSORRT, CUDA, CPU)
    # auto takes the best present provider without complaining about the absent ones.
    assert choose_providers("auto", [CUDA, CPU, "AzureExecutionProvider"]) \
        .providers == (CUDA, CPU)
    assert choose_providers("auto", cpu_only).warnings == ()
    # ONNX Runtime may list a provider it then fails to create: the session's choice is said.
    assert fallback_warning(choose_providers("cuda", [CUDA, CPU]), CPU) is not None
    assert fallback_warning(choose_providers("cuda", [CUDA, CPU]), CUDA) is None


def test_an_unknown_provider_name_is_one_clear_error():
    with pytest.raises(ProviderError, match=r"unknown execution provider 'gpu'.*cpu, cuda, "
                       r"tensorrt, auto"):
        choose_providers("gpu", [CPU])


@pytest.mark.skipif(bool(GPU_PROVIDERS), reason="this onnxruntime has a GPU provider")
@pytest.mark.parametrize("asked", ["cuda", "tensorrt"])
def test_runner_falls_back_to_cpu_and_records_what_it_runs_on(tmp_path, caplog, asked):
    with caplog.at_level(logging.WARNING, logger="sdr_edge.inference.providers"):
        runner = open_runner(tiny_onnx(tmp_path / "m.onnx"), provider=asked)
    assert runner.provider == CPU == runner.session.get_providers()[0]
    assert CUDA in " ".join(runner.provider_warnings)
    assert CUDA in caplog.text and "falling back" in caplog.text
    assert runner.run(np.zeros((3, 1, 4, 4), np.float32)).shape == (3, 3)
    assert CPU in runner.describe()


def test_auto_and_the_default_run_on_the_best_present_provider(tmp_path, caplog):
    path = tiny_onnx(tmp_path / "m.onnx")
    best = next(p for p in (TENSORRT, CUDA, CPU) if p in ort.get_available_providers())
    with caplog.at_level(logging.WARNING):
        assert open_runner(path, provider="auto").provider == best
        assert open_runner(path).provider == CPU  # no provider asked: CPU, as before
    assert "falling back" not in caplog.text


def test_engines_refuse_a_provider_they_cannot_run_on(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"ftrt" + bytes(60))
    with pytest.raises(ProviderError, match="runs on TensorRT only"):
        open_runner(engine, provider="cpu")
    with pytest.raises(ProviderError, match="unknown execution provider"):
        open_runner(engine, provider="npu")


def test_layout_comes_from_the_graph_and_must_match_the_metadata(tmp_path):
    from sdr_edge.export.onnx_export import add_raw_input

    plain = OrtRunner(tiny_onnx(tmp_path / "m.onnx"))
    assert plain.input_layout == NORMALIZED_NCHW
    raw_path = add_raw_input(tmp_path / "m.onnx", tmp_path / "raw.onnx", SPEC)
    raw = OrtRunner(raw_path)  # metadata names no layout (copied): the graph decides
    assert raw.input_layout == RAW_NHWC
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    # The raw graph normalises exactly as the host does.
    np.testing.assert_allclose(raw.run(model_input(raw, images, SPEC)),
                               plain.run(model_input(plain, images, SPEC)), atol=1e-6)
    with pytest.raises(ValueError, match="raw-input graph: it takes uint8"):
        raw.run(model_input(plain, images, SPEC))  # never normalised twice
    wrong = tiny_onnx(tmp_path / "wrong.onnx", extra={"input_layout": RAW_NHWC})
    with pytest.raises(ModelFileError, match="graph takes float32_nchw_normalized input but "
                       "its metadata says uint8_nhwc"):
        OrtRunner(wrong)
