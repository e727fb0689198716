"""Run a serialized TensorRT engine with polygraphy's `TrtRunner`.

polygraphy deserializes the engine (`EngineFromPath`, which also allows the lean runtime of
version-compatible plans), creates the execution context, sets input shapes and owns the
device buffers and the CUDA stream. What stays here is what `sdr-client infer` needs on top:
the engine's metadata JSON (input spec, label names), and batches split to the engine's
profile (larger ones in chunks, smaller ones padded up to its minimum). Engine files hold
executable GPU code: load only engines you built (their metadata JSON sits next to them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.artifacts.model_metadata import (
    MetadataError,
    ModelMetadata,
    engine_metadata_path,
    read_sidecar,
)
from sdr_edge.inference.base import iter_chunks
from sdr_edge.inference.cuda_device import quiet_polygraphy, require_tensorrt_and_gpu
from sdr_edge.inference.model_file import ModelFileError


class TrtRunner:
    """A TensorRT engine plus the metadata `sdr-export trt` wrote beside it."""

    runtime = "tensorrt"

    def __init__(self, path: str | Path, metadata_path: str | Path | None = None) -> None:
        self.path = Path(path)
        trt, self.gpu = require_tensorrt_and_gpu("running a TensorRT engine")
        meta_path = Path(metadata_path) if metadata_path else engine_metadata_path(self.path)
        try:
            self.metadata: ModelMetadata | None
            self.metadata, self.doc = read_sidecar(meta_path)
        except MetadataError as exc:
            raise MetadataError(f"{exc}; engines built by `sdr-export trt` have their input "
                                "spec and label names in that file") from exc
        from polygraphy.backend.trt import EngineFromPath
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        from polygraphy.exception import PolygraphyException

        quiet_polygraphy()
        self.trt = trt
        try:
            engine = EngineFromPath(str(self.path))()
        except PolygraphyException as exc:
            built = self.doc.get("tensorrt_version", "?"), self.doc.get("gpu", {}).get("name", "?")
            raise ModelFileError(
                f"TensorRT {trt.__version__} could not deserialize {self.path} (built with "
                f"TensorRT {built[0]} on {built[1]}): {str(exc).splitlines()[0]}; rebuild it on "
                "this device with `sdr-export trt`"
            ) from exc
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelFileError(f"{self.path}: expected one input and one output, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, _, hi = engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self.engine = engine
        self.runner = PolygraphyTrtRunner(engine, name=f"tensorrt:{self.path.name}")
        self.runner.activate()

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """One engine execution for min_batch <= len(x) <= max_batch."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        out = self.runner.infer({self.input_name: x})[self.output_name]
        # polygraphy reuses its host output buffers between calls: copy.
        return np.array(out, dtype=np.float32, copy=True)

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            raise ValueError("no input to run (empty batch)")
        outs = []
        for start, stop in iter_chunks(x.shape[0], self.max_batch):
            chunk = x[start:stop]
            n = chunk.shape[0]
            if n < self.min_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.min_batch - n, axis=0)])
            outs.append(self.run_batch(chunk)[:n])
        return np.concatenate(outs)

    def describe(self) -> str:
        return (f"TensorRT {self.trt.__version__} on {self.gpu.name}, batch "
                f"{self.min_batch}..{self.max_batch} (polygraphy TrtRunner)")

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()
