"""Run a serialized TensorRT engine with the TensorRT 10 tensor API.

Shapes go in with `set_input_shape`, buffers with `set_tensor_address`, and the work is
queued with `execute_async_v3` on our CUDA stream. Batches larger than the engine's profile
are split, smaller ones padded up to its minimum. Engine files hold executable GPU code: load
only engines you built (their metadata JSON sits next to them).
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
from sdr_edge.inference.cuda_device import DeviceMemory, device_memory, require_tensorrt_and_gpu
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
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        if self.doc.get("version_compatible"):
            # Version-compatible plans embed a lean runtime (host code) that must be allowed.
            self.trt_runtime.engine_host_code_allowed = True
        self.engine = self.trt_runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            built = self.doc.get("tensorrt_version", "?"), self.doc.get("gpu", {}).get("name", "?")
            raise ModelFileError(
                f"TensorRT {trt.__version__} could not deserialize {self.path} (built with "
                f"TensorRT {built[0]} on {built[1]}); rebuild it on this device with "
                "`sdr-export trt`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelFileError(f"{self.path}: expected one input and one output, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.memory: DeviceMemory = device_memory()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity in bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            ptr = self.memory.alloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """One engine execution for min_batch <= len(x) <= max_batch."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(f"engine {self.path.name} does not accept input shape {x.shape}")
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        out = np.empty(out_shape, dtype=self.output_dtype)
        in_ptr = self._buffer(self.input_name, x.nbytes)
        out_ptr = self._buffer(self.output_name, out.nbytes)
        self.memory.h2d(in_ptr, x)
        self.context.set_tensor_address(self.input_name, in_ptr)
        self.context.set_tensor_address(self.output_name, out_ptr)
        if not self.context.execute_async_v3(self.memory.stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path.name}")
        self.memory.d2h(out, out_ptr)
        return out.astype(np.float32, copy=False)

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
                f"{self.min_batch}..{self.max_batch} ({self.memory.name} buffers)")

    def close(self) -> None:
        self.memory.close()
