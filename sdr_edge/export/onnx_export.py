"""PyTorch -> ONNX with the dynamo exporter: dynamic batch axis, weights inline, full check.

Weights stay inside the .onnx file (a device gets one file, and the checksum in the sidecar
covers everything); models here are far below protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from sdr_edge.artifacts.model_metadata import METADATA_KEY, ModelMetadata
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
