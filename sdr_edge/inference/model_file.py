"""Tell an ONNX model from a TensorRT engine by their bytes, not their file names.

An ONNX file is a serialized `ModelProto` protobuf: it opens with known top-level fields
(ir_version, producer_name, graph, ...) with the right wire types. A TensorRT plan (engine)
opens with the magic bytes `ftrt`. Anything else is refused with a message saying what was
found, before any runtime is loaded.
"""

from __future__ import annotations

from pathlib import Path

from sdr_edge.errors import SdrEdgeError

ONNX = "onnx"
ENGINE = "engine"
TRT_PLAN_MAGIC = b"ftrt"

# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited).
_MODELPROTO_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


class ModelFileError(SdrEdgeError, ValueError):
    """A model file is missing, empty, or neither an ONNX model nor a TensorRT engine."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def looks_like_onnx(head: bytes, file_size: int, max_fields: int = 4) -> bool:
    """True when the first top-level protobuf fields are valid `ModelProto` fields."""
    pos, seen = 0, set()
    try:
        while pos < len(head) and len(seen) < max_fields:
            tag, pos = _varint(head, pos)
            number, wire = tag >> 3, tag & 7
            if _MODELPROTO_FIELDS.get(number) != wire:
                return False
            if wire == 0:
                value, pos = _varint(head, pos)
                if number == 1 and not 1 <= value <= 64:  # ir_version
                    return False
            else:
                length, pos = _varint(head, pos)
                if pos + length > file_size:
                    return False
                pos += length
            seen.add(number)
            if number == 7:  # the graph: enough evidence
                break
    except ValueError:
        return False
    return bool(seen & {1, 7})


def detect_model_format(path: str | Path) -> str:
    """'onnx' or 'engine' from the file's leading bytes; ModelFileError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"model file is empty: {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(TRT_PLAN_MAGIC):
        return ENGINE
    if looks_like_onnx(head, size):
        return ONNX
    raise ModelFileError(
        f"{path} is neither an ONNX model (no ModelProto header) nor a TensorRT engine "
        f"(no '{TRT_PLAN_MAGIC.decode()}' magic); it starts with {head[:8]!r}"
    )
