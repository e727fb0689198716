"""PyTorch -> ONNX with the dynamo exporter: dynamic batch axis, weights inline, full check.

Weights stay inside the .onnx file (a device gets one file, and the checksum in the sidecar
covers everything); models here are far below protobuf's 2 GB limit.

`add_raw_input` puts the preprocessing into the graph (`--raw-input`): a small graph
(Cast, Div 255, Sub mean, Div std, Transpose NHWC -> NCHW, in `normalize_batch`'s order so
the float32 arithmetic is the same) is joined in front of the exported model with
`onnx.compose.merge_models`. It is applied to the finished fp32, fp16 or int8 graph, so the
converters and the int8 calibrator see the float NCHW input they always saw.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper
from torch import nn

from sdr_edge.artifacts.model_metadata import METADATA_KEY, ModelMetadata
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.errors import SdrEdgeError

MIN_OPSET = 18
INPUT_NAME = "input"


class OnnxExportError(SdrEdgeError, ValueError):
    """The exporter or the ONNX checker refused the model."""


def _quiet_exporter_logs() -> None:
    """Keep the exporter's chatter (optional torchvision ops, optimizer passes) off the console."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)


def export_fp32(model: nn.Module, image_size: int, channels: int, path: str | Path,
                output_name: str, opset: int = MIN_OPSET, batch: int | None = None) -> Path:
    """Export `model` (eval mode) to `path`; batch None means a dynamic batch axis."""
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} is too old: sdr-edge exports opset >= {MIN_OPSET}")
    if batch is not None and batch < 1:
        raise OnnxExportError(f"fixed batch must be >= 1, got {batch}")
    _quiet_exporter_logs()
    model = model.eval()
    # Two examples: a batch of 1 would let the tracer specialise the batch axis to 1.
    example = torch.randn(batch or 2, channels, image_size, image_size)
    dynamic = None
    if batch is None:
        dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # torch's own pytree code trips its deprecation of LeafSpec while exporting.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(
                model, (example,), None, input_names=[INPUT_NAME], output_names=[output_name],
                opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic,
                optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; one clear message is enough
        raise OnnxExportError(f"torch.onnx.export failed: {exc}") from exc
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    path = Path(path)
    onnx.save(program.model_proto, str(path), save_as_external_data=False)
    return path


def attach_metadata(src: str | Path, dst: str | Path, meta: ModelMetadata) -> Path:
    """Copy src to dst with the sdr-edge metadata in `metadata_props` (replacing any)."""
    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
    onnx.save(model, str(dst), save_as_external_data=False)
    return Path(dst)


def check_onnx(path: str | Path, min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Full ONNX check, weights inline (no external data), default-domain opset >= min_opset."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"ONNX checker rejected {path.name}: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise OnnxExportError(f"{path.name} keeps {len(external)} tensor(s) in external data "
                              f"(e.g. {external[0]}); weights must be inline")
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx", 0)) < min_opset:
        raise OnnxExportError(f"{path.name} uses opset {opsets} < {min_opset}")
    return model


_RAW = "sdr_edge_raw_"  # prefix of every name the preprocessing graph adds


def _input_dims(graph: onnx.GraphProto, name: str) -> list[int | str]:
    value = next((i for i in graph.input if i.name == name), None)
    if value is None:
        raise OnnxExportError(f"the graph has no input named {name!r}")
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise OnnxExportError(f"input {name!r} has shape {dims}, expected N x C x H x W")
    return dims


def add_raw_input(src: str | Path, dst: str | Path, spec: InputSpec,
                  input_name: str = INPUT_NAME) -> Path:
    """Copy src to dst with a uint8 N x H x W x C input that is normalised inside the graph."""
    model = onnx.load(str(src))
    n, c, h, w = _input_dims(model.graph, input_name)
    if (c, h, w) != (spec.channels, spec.image_size, spec.image_size):
        raise OnnxExportError(f"input {input_name!r} is {c} x {h} x {w}, the input spec says "
                              f"{spec.channels} x {spec.image_size} x {spec.image_size}")
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    consts = [numpy_helper.from_array(np.asarray(255.0, np.float32), _RAW + "255"),
              numpy_helper.from_array(mean, _RAW + "mean"),
              numpy_helper.from_array(std, _RAW + "std")]
    nodes = [
        helper.make_node("Cast", [input_name], [_RAW + "float"], to=TensorProto.FLOAT,
                         name=_RAW + "cast"),
        helper.make_node("Div", [_RAW + "float", _RAW + "255"], [_RAW + "unit"],
                         name=_RAW + "div255"),
        helper.make_node("Sub", [_RAW + "unit", _RAW + "mean"], [_RAW + "centred"],
                         name=_RAW + "sub_mean"),
        helper.make_node("Div", [_RAW + "centred", _RAW + "std"], [_RAW + "nhwc"],
                         name=_RAW + "div_std"),
        helper.make_node("Transpose", [_RAW + "nhwc"], [_RAW + "nchw"], perm=[0, 3, 1, 2],
                         name=_RAW + "to_nchw"),
    ]
    graph = helper.make_graph(
        nodes, "sdr_edge_preprocess",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, [n, h, w, c])],
        [helper.make_tensor_value_info(_RAW + "nchw", TensorProto.FLOAT, [n, c, h, w])],
        initializer=consts,
    )
    default = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    pre = helper.make_model(graph, ir_version=model.ir_version,
                            opset_imports=[helper.make_opsetid("", default)])
    try:
        merged = compose.merge_models(pre, model, io_map=[(_RAW + "nchw", input_name)],
                                      producer_name=model.producer_name,
                                      producer_version=model.producer_version)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise OnnxExportError(f"cannot put the preprocessing into {Path(src).name}: "
                              f"{exc}") from exc
    onnx.save(merged, str(dst), save_as_external_data=False)
    return Path(dst)
