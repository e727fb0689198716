"""One reader of an exported ONNX file: its tensors, its sdr-edge metadata, its quantization.

Used by every writer that turns an exported model into something a runtime serves: Triton
(`triton.py`), DeepStream (`deepstream.py`) and the TensorRT builder (`tensorrt_build.py`).
They derive their inputs and outputs from the graph itself (names, element types, shapes),
never from what the metadata claims, and read the label names, normalisation and precision
from the metadata. The serving-config writers publish folders that a server running as
another user must read (`share_modes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from sdr_edge.artifacts.model_metadata import MetadataError, ModelMetadata, metadata_from_props
from sdr_edge.errors import SdrEdgeError


class ModelGraphError(SdrEdgeError, ValueError):
    """An ONNX file that cannot be described to a serving runtime."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output, its dimensions as the file writes them: a dim_value, a
    dim_param (the name of a dynamic axis, e.g. "batch"), or "?" where neither is set."""

    name: str
    elem_type: int  # onnx.TensorProto.DataType
    dims: tuple[int | str, ...]

    @property
    def shape(self) -> tuple[int | None, ...]:
        """The dimensions with every dynamic one (named, unset or not positive) as None."""
        return tuple(d if isinstance(d, int) and d > 0 else None for d in self.dims)

    @property
    def type_name(self) -> str:
        return onnx.TensorProto.DataType.Name(self.elem_type)


@dataclass(frozen=True)
class ModelGraph:
    """An exported model as read from its file (weights included; they are small)."""

    path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: ModelMetadata
    proto: onnx.ModelProto

    @property
    def activation_quant_types(self) -> tuple[str, ...]:
        """Element types of the QuantizeLinear zero points (the activations' integer type,
        e.g. ("uint8",) for ONNX Runtime's CPU QDQ, ("int8",) for TensorRT's); () if none."""
        inits = {t.name: t for t in self.proto.graph.initializer}
        kinds = set()
        for node in self.proto.graph.node:
            if node.op_type == "QuantizeLinear" and len(node.input) >= 3 \
                    and node.input[2] in inits:
                kinds.add(onnx.TensorProto.DataType.Name(inits[node.input[2]].data_type).lower())
        return tuple(sorted(kinds))

    def tensorrt_int8_refusal(self) -> str | None:
        """Why TensorRT cannot build this graph's int8, or None: its explicit INT8 takes signed,
        symmetric Q/DQ only, and uint8 activations are ONNX Runtime's CPU quantization. Read
        from the graph, not the metadata (which can be edited); the engine builder and the
        DeepStream export both refuse with this message."""
        if "uint8" not in self.activation_quant_types:
            return None
        return (f"{self.path} is int8 for ONNX Runtime on CPUs (uint8 asymmetric activations), "
                "which TensorRT cannot build: TensorRT takes int8 symmetric Q/DQ only; re-export "
                "it with `sdr-export onnx --precision int8 --int8-target tensorrt`")


def _tensor(value: onnx.ValueInfoProto, path: Path) -> TensorInfo:
    t = value.type
    if not t.HasField("tensor_type"):
        raise ModelGraphError(f"{path}: graph value {value.name!r} is not a tensor")
    tt = t.tensor_type
    if not tt.HasField("shape"):
        raise ModelGraphError(f"{path}: tensor {value.name!r} has no shape (rank unknown)")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in tt.shape.dim)
    return TensorInfo(value.name, int(tt.elem_type), dims)


def read_model_graph(path: str | Path) -> ModelGraph:
    """Load `path` and describe its inputs and outputs; every error is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelGraphError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise ModelGraphError(f"{path}: not a readable ONNX model ({exc})") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ModelGraphError(f"{path}: weights are stored in external files; export them "
                              "inside the model (`sdr-export onnx` does) so one file travels")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = tuple(_tensor(v, path) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_tensor(v, path) for v in proto.graph.output)
    if not inputs or not outputs:
        raise ModelGraphError(f"{path}: the graph has no inputs or no outputs")
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = metadata_from_props(props, str(path))
    except MetadataError as exc:
        raise ModelGraphError(str(exc)) from exc
    return ModelGraph(path, inputs, outputs, meta, proto)


def share_modes(root: Path) -> None:
    """Give what was staged the modes of plain files and folders under the umask (staging
    makes them private, 0600 / 0700), so that a server running as another user reads them."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
