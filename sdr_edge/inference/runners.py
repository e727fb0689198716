"""Model runners for devices: ONNX Runtime on any CPU, TensorRT engines on NVIDIA GPUs.

`open_runner` picks the runtime from the file's bytes (see `model_file`). An ONNX model runs
in ONNX Runtime on the execution provider asked for (`providers.choose_providers`: cpu, cuda,
tensorrt or auto, with fallback), and the runner records the provider the session took.
Runners take any number of model inputs (float32 NCHW normalised, or uint8 NHWC for a
raw-input graph: `input_layout`, read from the graph) and split them into the batch sizes the
model accepts, padding a fixed-batch model's last chunk. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.artifacts.model_metadata import MetadataError, ModelMetadata, metadata_from_props
from sdr_edge.inference.base import (
    DEFAULT_CHUNK,
    INPUT_LAYOUT_KEY,
    NORMALIZED_NCHW,
    RAW_NHWC,
    Runner,
    metadata_layout,
    run_in_chunks,
)
from sdr_edge.inference.model_file import ENGINE, ONNX, ModelFileError, detect_model_format
from sdr_edge.inference.providers import (
    ProviderChoice,
    ProviderError,
    choose_providers,
    fallback_warning,
    provider_name,
)

# ONNX Runtime's type strings for the two input layouts.
_LAYOUT_OF_TYPE = {"tensor(float)": NORMALIZED_NCHW, "tensor(uint8)": RAW_NHWC}


class OrtRunner:
    """An ONNX model in ONNX Runtime (CPU provider by default) with its sdr-edge metadata.

    `provider` is a short name (cpu, cuda, tensorrt, auto); `providers`, an explicit list of
    ONNX Runtime provider names, overrides it. `self.provider` is the one the session took.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None, require_metadata: bool = True,
                 optimization: str = "all", provider: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        if providers:
            self.choice = ProviderChoice("explicit", tuple(providers))
        else:
            self.choice = choose_providers(provider, available)
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
                                                providers=list(self.choice.providers))
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise ModelFileError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        late = fallback_warning(self.choice, self.provider)
        self.provider_warnings = [*self.choice.warnings, *([late] if late else [])]
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelFileError(f"{self.path}: expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_layout = _LAYOUT_OF_TYPE.get(inputs[0].type)
        if self.input_layout is None:
            raise ModelFileError(f"{self.path}: input {self.input_name!r} is {inputs[0].type}; "
                                 "sdr-edge models take float32 NCHW or uint8 NHWC (raw) images")
        self.input_dtype = np.dtype(np.uint8 if self.input_layout == RAW_NHWC else np.float32)
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
        # The graph decides; metadata that names a layout (exports since --raw-input) must agree.
        if (self.metadata is not None and INPUT_LAYOUT_KEY in self.metadata.extra
                and metadata_layout(self.metadata) != self.input_layout):
            raise ModelFileError(f"{self.path}: the graph takes {self.input_layout} input but "
                                 f"its metadata says {metadata_layout(self.metadata)}")

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """One session call, no chunking."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run(self, x: np.ndarray, batch: int = DEFAULT_CHUNK) -> np.ndarray:
        if self.input_layout == RAW_NHWC and x.dtype != np.uint8:
            raise ValueError(f"{self.path.name} is a raw-input graph: it takes uint8 N x H x W x C "
                             f"images, not {x.dtype}")
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if self.fixed_batch:
            return run_in_chunks(self.run_batch, x, self.fixed_batch, fixed=True)
        return run_in_chunks(self.run_batch, x, batch, fixed=False)

    def describe(self) -> str:
        batch = self.fixed_batch or "dynamic"
        raw = ", uint8 NHWC input" if self.input_layout == RAW_NHWC else ""
        return f"ONNX Runtime {self._version()} ({self.provider}), batch {batch}{raw}"

    @staticmethod
    def _version() -> str:
        import onnxruntime as ort

        return ort.__version__


def open_runner(path: str | Path, threads: int | None = None,
                provider: str | None = None) -> Runner:
    """An ONNX Runtime or TensorRT runner, chosen by what the file is.

    `provider` picks ONNX Runtime's execution provider for an ONNX model (see
    `providers.choose_providers`; None means cpu, as before providers could be chosen). A
    TensorRT engine runs only on TensorRT: None, `tensorrt` and `auto` accept it, `cpu` and
    `cuda` are refused rather than silently ignored.
    """
    name = provider_name(provider) if provider is not None else None
    kind = detect_model_format(path)
    if kind == ONNX:
        return OrtRunner(path, threads=threads, provider=name or "cpu")
    if kind == ENGINE:
        if name not in (None, "tensorrt", "auto"):
            raise ProviderError(f"{path} is a TensorRT engine: it runs on TensorRT only, not on "
                                f"the {name} provider (use --provider tensorrt "
                                "or auto, or give the ONNX model)")
        from sdr_edge.inference.trt_runner import TrtRunner

        return TrtRunner(path)
    raise AssertionError(kind)
