"""ONNX -> TensorRT engine through NVIDIA's polygraphy, checked against ONNX Runtime.

polygraphy parses the ONNX (`NetworkFromOnnxPath`, strongly typed), configures the builder
(`CreateConfig`: batch profile, workspace, timing cache, version/hardware compatibility; TF32
stays off), builds (`EngineFromNetwork`, which also saves the timing cache) and saves the
engine (`SaveEngine`); `engine_compare` then runs the saved file with polygraphy's `TrtRunner`
against our ONNX Runtime session with polygraphy's comparator. polygraphy docs:
https://docs.nvidia.com/deeplearning/tensorrt/polygraphy/docs/backend/trt/loader.html

Precision comes from the ONNX itself: fp32, fp16 weights from `sdr-export onnx --precision
fp16`, or QDQ int8 from `--precision int8 --int8-target tensorrt`, calibrated there on the
bundle's calibration images (ONNX Runtime's MinMax calibrator, `quantize.py`). That is what
TensorRT 11 requires (strongly typed networks) and TensorRT 10 supports; polygraphy's
`Calibrator` (implicit INT8, builder-side calibration) is deprecated since TensorRT 10.1 and
gone in 11, so it is not used. Everything up to the build (reading the ONNX input, batch
profile shapes, option checks, metadata) is plain Python and testable anywhere;
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

from sdr_edge.artifacts.atomic import fsync_dir, sha256_file
from sdr_edge.artifacts.model_metadata import engine_metadata_path
from sdr_edge.artifacts.staging import check_replaceable_file
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.engine_compare import (
    Comparison,
    compare_runners,
    comparison_inputs,
    make_batches,
    reference_runner,
)
from sdr_edge.export.onnx_graph import ModelGraph, ModelGraphError, read_model_graph
from sdr_edge.export.parity import raise_on_failure

log = logging.getLogger(__name__)

HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
ENGINE_FORMAT = "sdr-edge-engine"


class EngineBuildError(SdrEdgeError, ValueError):
    """Bad build options, an ONNX model TensorRT cannot take, or a failed build."""


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
    compare_images: Path | None = None  # real images for the check (else standard normal)
    extra: dict = field(default_factory=dict)


def check_tensorrt_compatible(graph: ModelGraph) -> None:
    """One input and one output; TensorRT's explicit INT8 takes signed, symmetric QDQ only."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise EngineBuildError(f"{graph.path.name}: expected one input and one output, found "
                               f"{len(graph.inputs)} and {len(graph.outputs)}")
    refusal = graph.tensorrt_int8_refusal()
    if refusal:
        raise EngineBuildError(refusal)
    inp = graph.inputs[0]
    if len(inp.dims) < 2:
        raise EngineBuildError(f"input {inp.name} has shape {inp.dims}: "
                               "expected a batch axis and image dimensions")
    rest = inp.dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise EngineBuildError(f"only the batch axis may be dynamic; input {inp.name} "
                               f"has shape {inp.dims}")


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
    if opts.compare_images is not None and not opts.compare_images.is_dir():
        raise EngineBuildError(f"--compare-images {opts.compare_images} is not a folder")


def prepare_build(opts: BuildOptions) -> tuple[ModelGraph, ProfileShapes]:
    """Everything before TensorRT: options, the ONNX model's input, the batch profile."""
    validate_options(opts)
    try:
        graph = read_model_graph(opts.onnx)
    except ModelGraphError as exc:  # `sdr-export trt` reports EngineBuildError; same line
        raise EngineBuildError(str(exc)) from exc
    check_tensorrt_compatible(graph)
    shapes = profile_shapes(graph.inputs[0].dims, opts.min_batch, opts.opt_batch,
                            opts.max_batch)
    return graph, shapes


def engine_metadata(graph: ModelGraph, shapes: ProfileShapes, opts: BuildOptions,
                    onnx_sha256: str, tensorrt_version: str, gpu: dict,
                    engine_sha256: str = "", checks: list[dict] | None = None,
                    build_seconds: float | None = None,
                    comparison: dict | None = None) -> dict:
    """The JSON written next to the engine: what it was built from, for what, and how."""
    doc = {
        "format": ENGINE_FORMAT,
        "format_version": 1,
        "builder": f"polygraphy {_polygraphy_version()}",
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "precision": graph.metadata.precision,
        "input": {"name": graph.inputs[0].name, "onnx_shape": list(graph.inputs[0].dims),
                  "profile": shapes.to_dict()},
        "output": {"name": graph.outputs[0].name, "onnx_shape": list(graph.outputs[0].dims)},
        "onnx": {"path": opts.onnx.name, "sha256": onnx_sha256},
        "engine_sha256": engine_sha256,
        "strongly_typed": True,
        "version_compatible": bool(opts.version_compatible),
        "hardware_compat": opts.hardware_compat,
        "workspace_mb": int(opts.workspace_mb),
        "checks": checks or [],
        "comparison": comparison or {},
    }
    if build_seconds is not None:
        doc["build_seconds"] = round(build_seconds, 3)
    doc["model_metadata"] = graph.metadata.to_dict()
    return doc


def check_engine_output(out: Path) -> None:
    """`out` and its metadata JSON must be absent or an earlier engine of ours (sha256 recorded)."""
    check_replaceable_file(out, engine_metadata_path(out), {ENGINE_FORMAT}, "engine_sha256")


# --- needs TensorRT and a GPU from here on -----------------------------------------------


def _polygraphy_version() -> str:
    import polygraphy

    return polygraphy.__version__


def _first_line(exc: BaseException) -> str:
    """polygraphy's errors carry its log; the first few lines say what failed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:3]) or type(exc).__name__


def build_config(trt, graph: ModelGraph, shapes: ProfileShapes, opts: BuildOptions,
                 cache_path: Path | None = None):
    """polygraphy's `CreateConfig` for our options (precision flags stay off: strongly typed).

    The timing cache is read from `cache_path`, the staged copy: polygraphy locks the file it
    reads with a `.lock` file beside it, which must not appear next to the user's cache.
    """
    from polygraphy.backend.trt import CreateConfig, Profile

    profile = Profile().add(graph.inputs[0].name, min=shapes.min, opt=shapes.opt,
                            max=shapes.max)
    kwargs = {}
    if opts.hardware_compat != "none":
        kwargs["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel,
                                                         HARDWARE_COMPAT[opts.hardware_compat])
    load_cache = str(cache_path) if cache_path is not None and cache_path.is_file() else None
    return CreateConfig(
        profiles=[profile], tf32=False,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(opts.workspace_mb) << 20},
        load_timing_cache=load_cache, version_compatible=opts.version_compatible or None,
        **kwargs,
    )


def build_engine(trt, graph: ModelGraph, shapes: ProfileShapes, opts: BuildOptions,
                 engine_path: Path, cache_path: Path | None) -> float:
    """Parse, build and save the engine (and the timing cache) with polygraphy; seconds taken."""
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
    from polygraphy.exception import PolygraphyException

    network = NetworkFromOnnxPath(str(opts.onnx), strongly_typed=True)
    build = EngineFromNetwork(network, config=build_config(trt, graph, shapes, opts, cache_path),
                              save_timing_cache=str(cache_path) if cache_path else None)
    t0 = time.perf_counter()
    try:
        engine = SaveEngine(build, path=str(engine_path))()
    except PolygraphyException as exc:
        raise EngineBuildError(f"TensorRT could not build an engine from {opts.onnx.name}: "
                               f"{_first_line(exc)}") from exc
    seconds = time.perf_counter() - t0
    del engine  # free the builder's copy before the check loads the saved file
    return seconds


def compare_engine(engine_path: Path, graph: ModelGraph, shapes: ProfileShapes,
                   opts: BuildOptions) -> Comparison:
    """The saved engine (polygraphy `TrtRunner`) against our ONNX Runtime session on the ONNX."""
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    from sdr_edge.inference.runners import OrtRunner

    spec = graph.metadata.input_spec
    x, where = comparison_inputs(spec, opts.sample_inputs, opts.seed, opts.compare_images)
    batches = make_batches(x, shapes.min[0], shapes.opt[0])
    ort = OrtRunner(opts.onnx)
    candidate = TrtRunner(EngineFromPath(str(engine_path)), name="tensorrt")
    meta = graph.metadata
    result = compare_runners(candidate, reference_runner(ort.session), batches,
                             graph.inputs[0].name, meta.precision, meta.output_kind, "TensorRT")
    result.report["inputs_from"] = where
    return result


def _stage_cache(opts: BuildOptions, stage: Path) -> Path | None:
    """A copy of the timing cache to build with, renamed over the real one after the build."""
    if opts.timing_cache is None:
        return None
    staged = stage / "timing.cache"
    if opts.timing_cache.is_file():
        shutil.copyfile(opts.timing_cache, staged)  # polygraphy merges into what is there
    return staged


def build_and_verify(opts: BuildOptions) -> dict:
    """Build, run the engine against ONNX Runtime, and write engine + metadata atomically.

    Everything is written in a staging folder beside `--out`; the timing cache is renamed into
    place once the build succeeded (it is valid whatever the check says), the engine and its
    metadata JSON only after the check passed.
    """
    from sdr_edge.inference.cuda_device import quiet_polygraphy, require_tensorrt_and_gpu

    graph, shapes = prepare_build(opts)
    check_engine_output(opts.out)
    trt, gpu = require_tensorrt_and_gpu("`sdr-export trt`")
    quiet_polygraphy()
    onnx_sha = sha256_file(opts.onnx)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        staged = stage / opts.out.name
        staged_cache = _stage_cache(opts, stage)
        build_seconds = build_engine(trt, graph, shapes, opts, staged, staged_cache)
        if staged_cache is not None and staged_cache.is_file():
            opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged_cache, opts.timing_cache)
            log.info("timing cache: saved %s", opts.timing_cache)
        comparison = compare_engine(staged, graph, shapes, opts)
        raise_on_failure(f"TensorRT {graph.metadata.precision} engine", comparison.checks)
        doc = engine_metadata(graph, shapes, opts, onnx_sha, trt.__version__, gpu.to_dict(),
                              sha256_file(staged), build_seconds=build_seconds,
                              checks=[c.to_dict() for c in comparison.checks],
                              comparison=comparison.report)
        staged_meta = engine_metadata_path(staged)
        staged_meta.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        staged_meta.chmod(0o644)
        check_engine_output(opts.out)  # again: the build took a while
        os.replace(staged, opts.out)
        os.replace(staged_meta, engine_metadata_path(opts.out))
        fsync_dir(opts.out.parent)
        return doc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
