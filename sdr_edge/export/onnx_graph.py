"""What the serving-config writers share: an exported ONNX file's tensors and sdr-edge metadata.

Used by the Triton and DeepStream writers (`triton.py`, `deepstream.py`): both derive their
inputs and outputs from the graph itself (names, element types, shapes), never from what the
metadata claims, and read the label names and normalisation from the metadata. Both publish
folders that a server running as another user must read (`share_modes`).
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
    """One graph input or output; a dimension of None is dynamic (dim_param or unset)."""

    name: str
    elem_type: int  # onnx.TensorProto.DataType
    shape: tuple[int | None, ...]

    @property
    def type_name(self) -> str:
        return onnx.TensorProto.DataType.Name(self.elem_type)


@dataclass(frozen=True)
class ModelGraph:
    path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: ModelMetadata
    proto: onnx.ModelProto


def _tensor(value: onnx.ValueInfoProto, path: Path) -> TensorInfo:
    t = value.type
    if not t.HasField("tensor_type"):
        raise ModelGraphError(f"{path}: graph value {value.name!r} is not a tensor")
    tt = t.tensor_type
    if not tt.HasField("shape"):
        raise ModelGraphError(f"{path}: tensor {value.name!r} has no shape (rank unknown)")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                  for d in tt.shape.dim)
    return TensorInfo(value.name, int(tt.elem_type), shape)


def read_model_graph(path: str | Path) -> ModelGraph:
    """Load `path` (weights included, they are small) and describe its inputs and outputs."""
    path = Path(path)
    if not path.is_file():
        raise ModelGraphError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise ModelGraphError(f"{path}: not an ONNX model ({exc})") from exc
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
