"""Model runners for devices: ONNX Runtime on any CPU, TensorRT engines on NVIDIA GPUs.

`open_runner` picks the runtime from the file's bytes (see `model_file`). Runners take any
number of preprocessed images (float32 NCHW) and split them into the batch sizes the model
accepts, padding a fixed-batch model's last chunk. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.artifacts.model_metadata import MetadataError, ModelMetadata, metadata_from_props
from sdr_edge.inference.base import DEFAULT_CHUNK, Runner, run_in_chunks
from sdr_edge.inference.model_file import ENGINE, ONNX, ModelFileError, detect_model_format


class OrtRunner:
    """An ONNX model in ONNX Runtime (CPU by default) with its sdr-edge metadata."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None, require_metadata: bool = True,
                 optimization: str = "all") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        opts.graph_optimization_level = levels[optimization]
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise ModelFileError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelFileError(f"{self.path}: expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        dim0 = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata: ModelMetadata | None
        try:
            self.metadata = metadata_from_props(props, str(self.path))
        except MetadataError:
            if require_metadata:
                raise
            self.metadata = None

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """One session call, no chunking."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run(self, x: np.ndarray, batch: int = DEFAULT_CHUNK) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed_batch:
            return run_in_chunks(self.run_batch, x, self.fixed_batch, fixed=True)
        return run_in_chunks(self.run_batch, x, batch, fixed=False)

    def describe(self) -> str:
        batch = self.fixed_batch or "dynamic"
        return f"ONNX Runtime {self._version()} ({self.session.get_providers()[0]}), batch {batch}"

    @staticmethod
    def _version() -> str:
        import onnxruntime as ort

        return ort.__version__


def open_runner(path: str | Path, threads: int | None = None) -> Runner:
    """An ONNX Runtime or TensorRT runner, chosen by what the file is."""
    kind = detect_model_format(path)
    if kind == ONNX:
        return OrtRunner(path, threads=threads)
    if kind == ENGINE:
        from sdr_edge.inference.trt_runner import TrtRunner

        return TrtRunner(path)
    raise AssertionError(kind)
