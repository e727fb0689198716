"""ONNX -> TensorRT engine with the TensorRT 10/11 Python API, then checked against ONNX Runtime.

The network is strongly typed: precision comes from the ONNX itself (fp32, fp16 weights from
`--precision fp16`, or QDQ int8 from `--precision int8 --int8-target tensorrt`), which is what
TensorRT 11 requires and TensorRT 10 supports. Everything up to the build (reading the ONNX
input, batch profile shapes, option checks, metadata) is plain Python and testable anywhere;
`build_and_verify` needs TensorRT and an NVIDIA GPU and says so at once when either is missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from sdr_edge.artifacts.atomic import atomic_write_bytes, fsync_dir, sha256_file
from sdr_edge.artifacts.model_metadata import (
    METADATA_KEY,
    MetadataError,
    ModelMetadata,
    engine_metadata_path,
    metadata_from_props,
)
from sdr_edge.artifacts.staging import check_replaceable_file
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.parity import (
    ParityCheck,
    cosine_check,
    raise_on_failure,
    scaled_abs_check,
    top1_agreement_check,
)

log = logging.getLogger(__name__)

HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
# Engine vs ONNX Runtime on the same inputs: different kernels and accumulation orders, so the
# bounds are looser than the export's PyTorch checks (TF32 is switched off for fp32 builds).
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
ENGINE_INT8_MIN_AGREEMENT = 0.99
ENGINE_INT8_MIN_COSINE = 0.99


ENGINE_FORMAT = "sdr-edge-engine"


class EngineBuildError(SdrEdgeError, ValueError):
    """Bad build options, an ONNX model TensorRT cannot take, or a failed build."""


@dataclass(frozen=True)
class OnnxModelInfo:
    """What the builder needs to know about the ONNX model, read without running it."""

    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    precision: str
    metadata: ModelMetadata | None
    activation_quant_types: tuple[str, ...] = ()

    @property
    def fixed_batch(self) -> int | None:
        dim = self.input_shape[0]
        return dim if isinstance(dim, int) and dim > 0 else None


@dataclass(frozen=True)
class ProfileShapes:
    """The optimisation profile of the input: (min, opt, max) full shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass
class BuildOptions:
    """`sdr-export trt` arguments."""

    onnx: Path
    out: Path
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compat: str = "none"
    workspace_mb: int = 1024
    sample_inputs: int = 256
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def _precision_from_graph(model: onnx.ModelProto) -> str:
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _activation_quant_types(model: onnx.ModelProto) -> tuple[str, ...]:
    """Element types of the QuantizeLinear zero points (the activations' integer type)."""
    inits = {t.name: t for t in model.graph.initializer}
    kinds = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) >= 3 and node.input[2] in inits:
            kinds.add(onnx.TensorProto.DataType.Name(inits[node.input[2]].data_type).lower())
    return tuple(sorted(kinds))


def read_onnx_info(path: str | Path) -> OnnxModelInfo:
    """Input/output names and shapes, precision and sdr-edge metadata of an ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise EngineBuildError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise EngineBuildError(f"{path} is not a readable ONNX model: {exc}") from exc
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise EngineBuildError(f"{path.name}: expected one input and one output, found "
                               f"{len(inputs)} and {len(model.graph.output)}")
    props = {p.key: p.value for p in model.metadata_props}
    meta = None
    if METADATA_KEY in props:
        try:
            meta = metadata_from_props(props, str(path))
        except MetadataError as exc:
            raise EngineBuildError(str(exc)) from exc
    return OnnxModelInfo(
        input_name=inputs[0].name, input_shape=_dims(inputs[0]),
        output_name=model.graph.output[0].name, output_shape=_dims(model.graph.output[0]),
        precision=meta.precision if meta else _precision_from_graph(model),
        metadata=meta, activation_quant_types=_activation_quant_types(model),
    )


def check_tensorrt_compatible(info: OnnxModelInfo) -> None:
    """TensorRT's explicit INT8 takes signed, symmetric QDQ only."""
    if info.precision == "int8" and "uint8" in info.activation_quant_types:
        raise EngineBuildError(
            "this int8 ONNX model was quantized for ONNX Runtime on CPUs (uint8 activations); "
            "TensorRT takes int8 symmetric QDQ only: re-export it with `sdr-export onnx "
            "--precision int8 --int8-target tensorrt`"
        )
    if len(info.input_shape) < 2:
        raise EngineBuildError(f"input {info.input_name} has shape {info.input_shape}: "
                               "expected a batch axis and image dimensions")
    rest = info.input_shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise EngineBuildError(f"only the batch axis may be dynamic; input {info.input_name} "
                               f"has shape {info.input_shape}")


def profile_shapes(input_shape: tuple[int | str, ...], min_batch: int | None,
                   opt_batch: int | None, max_batch: int | None) -> ProfileShapes:
    """min <= opt <= max batch shapes; a fixed-batch model admits only its own batch."""
    rest = tuple(int(d) for d in input_shape[1:])  # check_tensorrt_compatible ran first
    fixed = input_shape[0] if isinstance(input_shape[0], int) and input_shape[0] > 0 else None
    if fixed is not None:
        asked = {b for b in (min_batch, opt_batch, max_batch) if b is not None}
        if asked - {fixed}:
            raise EngineBuildError(f"the ONNX model has a fixed batch of {fixed}; batch "
                                   f"options {sorted(asked)} do not apply (re-export with "
                                   "--batch dynamic)")
        lo = opt = hi = fixed
    else:
        lo = 1 if min_batch is None else min_batch
        hi = max(32, lo) if max_batch is None else max_batch
        opt = max(lo, min(hi, 32)) if opt_batch is None else opt_batch
        for name, value in (("--min-batch", lo), ("--opt-batch", opt), ("--max-batch", hi)):
            if value < 1:
                raise EngineBuildError(f"{name} must be >= 1, got {value}")
        if not lo <= opt <= hi:
            raise EngineBuildError(f"batch sizes must satisfy min <= opt <= max, got "
                                   f"min {lo}, opt {opt}, max {hi}")
    return ProfileShapes((lo, *rest), (opt, *rest), (hi, *rest))


def validate_options(opts: BuildOptions) -> None:
    """Argument checks that need neither TensorRT nor a GPU."""
    if opts.hardware_compat not in HARDWARE_COMPAT:
        raise EngineBuildError(f"unknown --hardware-compat {opts.hardware_compat!r} "
                               f"({', '.join(HARDWARE_COMPAT)})")
    if opts.workspace_mb < 1:
        raise EngineBuildError(f"--workspace-mb must be >= 1, got {opts.workspace_mb}")
    if opts.out.suffix == ".onnx":
        raise EngineBuildError(f"--out {opts.out} would overwrite an ONNX file; use .engine")
    if opts.out.resolve() == opts.onnx.resolve():
        raise EngineBuildError("--out must differ from --onnx")
    if opts.timing_cache is not None and opts.timing_cache.exists() \
            and not opts.timing_cache.is_file():
        raise EngineBuildError(f"--timing-cache {opts.timing_cache} is not a file")
    if opts.sample_inputs < 1:
        raise EngineBuildError("the engine check needs at least one sample input")


def prepare_build(opts: BuildOptions) -> tuple[OnnxModelInfo, ProfileShapes]:
    """Everything before TensorRT: options, the ONNX model's input, the batch profile."""
    validate_options(opts)
    info = read_onnx_info(opts.onnx)
    if info.metadata is None:
        raise EngineBuildError(f"{opts.onnx.name} has no sdr-edge metadata (input spec, label "
                               "names): export it with `sdr-export onnx` first")
    check_tensorrt_compatible(info)
    shapes = profile_shapes(info.input_shape, opts.min_batch, opts.opt_batch, opts.max_batch)
    return info, shapes


def engine_metadata(info: OnnxModelInfo, shapes: ProfileShapes, opts: BuildOptions,
                    onnx_sha256: str, tensorrt_version: str, gpu: dict,
                    engine_sha256: str = "", checks: list[dict] | None = None,
                    build_seconds: float | None = None) -> dict:
    """The JSON written next to the engine: what it was built from, for what, and how."""
    doc = {
        "format": ENGINE_FORMAT,
        "format_version": 1,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "precision": info.precision,
        "input": {"name": info.input_name, "onnx_shape": list(info.input_shape),
                  "profile": shapes.to_dict()},
        "output": {"name": info.output_name, "onnx_shape": list(info.output_shape)},
        "onnx": {"path": opts.onnx.name, "sha256": onnx_sha256},
        "engine_sha256": engine_sha256,
        "strongly_typed": True,
        "version_compatible": bool(opts.version_compatible),
        "hardware_compat": opts.hardware_compat,
        "workspace_mb": int(opts.workspace_mb),
        "checks": checks or [],
    }
    if build_seconds is not None:
        doc["build_seconds"] = round(build_seconds, 3)
    if info.metadata is not None:
        doc["model_metadata"] = info.metadata.to_dict()
    return doc


def engine_checks(precision: str, output_kind: str, ref: np.ndarray, got: np.ndarray
                  ) -> list[ParityCheck]:
    """Engine vs ONNX Runtime (tolerance by precision, see ENGINE_TOLERANCE)."""
    if precision in ENGINE_TOLERANCE:
        return [scaled_abs_check(f"TensorRT {precision} vs ONNX Runtime", ref, got,
                                 ENGINE_TOLERANCE[precision])]
    if output_kind == "features":
        return [cosine_check("TensorRT int8 vs ONNX Runtime", ref, got, ENGINE_INT8_MIN_COSINE)]
    return [top1_agreement_check("TensorRT int8 vs ONNX Runtime", ref, got,
                                 ENGINE_INT8_MIN_AGREEMENT)]


def sample_inputs(shapes: ProfileShapes, count: int, seed: int) -> np.ndarray:
    """Inputs for the engine check: standard normal, i.e. the scale of normalised images."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, *shapes.opt[1:])).astype(np.float32)


# --- needs TensorRT and a GPU from here on -----------------------------------------------


def _parser_errors(parser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        node = err.node() if hasattr(err, "node") else -1
        if node is not None and node >= 0:
            name = err.node_name() if hasattr(err, "node_name") else ""
            op = err.node_operator() if hasattr(err, "node_operator") else ""
            where = f" at node {node} {name} ({op})".rstrip()
        lines.append(f"[{err.code()}]{where}: {err.desc()}")
    return "; ".join(lines) or "no error recorded"


def build_serialized_engine(trt, info: OnnxModelInfo, shapes: ProfileShapes,
                            opts: BuildOptions) -> bytes:
    """Parse the ONNX model into a strongly typed network and build the serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(opts.onnx)):
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {opts.onnx.name}: "
                               f"{_parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    if info.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # keep fp32 an fp32 engine (parity 1e-3)
    profile = builder.create_optimization_profile()
    profile.set_shape(info.input_name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compat != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      HARDWARE_COMPAT[opts.hardware_compat])
    cache_bytes = b""
    if opts.timing_cache is not None and opts.timing_cache.is_file():
        cache_bytes = opts.timing_cache.read_bytes()
        log.info("timing cache: loaded %d bytes from %s", len(cache_bytes), opts.timing_cache)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {opts.onnx.name} "
                               "(see the TensorRT log above)")
    if opts.timing_cache is not None:
        atomic_write_bytes(opts.timing_cache, bytes(memoryview(config.get_timing_cache()
                                                               .serialize())))
    return bytes(memoryview(serialized))


def check_engine_output(out: Path) -> None:
    """`out` and its metadata JSON must be absent or an earlier engine of ours (sha256 recorded)."""
    check_replaceable_file(out, engine_metadata_path(out), {ENGINE_FORMAT}, "engine_sha256")


def build_and_verify(opts: BuildOptions) -> dict:
    """Build, run the engine against ONNX Runtime, and write engine + metadata atomically."""
    from sdr_edge.inference.cuda_device import require_tensorrt_and_gpu
    from sdr_edge.inference.runners import OrtRunner
    from sdr_edge.inference.trt_runner import TrtRunner

    info, shapes = prepare_build(opts)
    check_engine_output(opts.out)
    trt, gpu = require_tensorrt_and_gpu("`sdr-export trt`")
    onnx_sha = sha256_file(opts.onnx)
    t0 = time.perf_counter()
    engine_bytes = build_serialized_engine(trt, info, shapes, opts)
    build_seconds = time.perf_counter() - t0

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        staged = stage / opts.out.name
        staged.write_bytes(engine_bytes)
        doc = engine_metadata(info, shapes, opts, onnx_sha, trt.__version__, gpu.to_dict(),
                              sha256_file(staged), build_seconds=build_seconds)
        staged_meta = engine_metadata_path(staged)
        staged_meta.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        x = sample_inputs(shapes, opts.sample_inputs, opts.seed)
        small = x[: shapes.min[0]]  # the smallest profile batch runs too, not only full chunks
        ort_runner = OrtRunner(opts.onnx)
        ref = np.concatenate([ort_runner.run(x), ort_runner.run(small)])
        runner = TrtRunner(staged, staged_meta)
        try:
            got = np.concatenate([runner.run(x), runner.run(small)])
        finally:
            runner.close()
        checks = engine_checks(info.precision, info.metadata.output_kind, ref, got)
        raise_on_failure(f"TensorRT {info.precision} engine", checks)
        doc["checks"] = [c.to_dict() for c in checks]
        staged_meta.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        staged_meta.chmod(0o644)
        check_engine_output(opts.out)  # again: the build took a while
        os.replace(staged, opts.out)
        os.replace(staged_meta, engine_metadata_path(opts.out))
        fsync_dir(opts.out.parent)
        return doc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
