"""Build a TensorRT engine from an exported ONNX model with polygraphy, checked against ONNX Runtime.

Needs the TensorRT Python package and an NVIDIA GPU (`pip install 'sdr-edge[trt]'`, or
JetPack on Jetson); without them it stops at once and says what is missing. The network is
strongly typed (precision comes from the ONNX), the batch axis gets an optimisation profile,
and the engine is written next to a metadata JSON (with polygraphy's comparison report) only
after it matched ONNX Runtime within the tolerance of its precision.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, type=Path, help="model.onnx from `sdr-export onnx`")
    p.add_argument("--out", required=True, type=Path, help="output model.engine")
    p.add_argument("--min-batch", type=int, default=None, help="smallest batch (default 1)")
    p.add_argument("--opt-batch", type=int, default=None,
                   help="batch TensorRT tunes for (default min(max, 32))")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch (default 32)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file: loaded if present, saved after the build")
    p.add_argument("--version-compatible", action="store_true",
                   help="engine runs on later TensorRT versions (may be slower)")
    p.add_argument("--hardware-compat", choices=("none", "ampere+", "same-cc"), default="none",
                   help="engine runs on other GPUs: Ampere and newer, or same compute capability")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit")
    p.add_argument("--sample-inputs", type=int, default=256,
                   help="inputs the engine is compared with ONNX Runtime on")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample inputs")
    p.add_argument("--compare-images", type=Path, default=None,
                   help="folder of images to compare on (e.g. the calibration images; default: "
                        "standard normal inputs)")


def options_from_args(args: argparse.Namespace):
    from sdr_edge.export.tensorrt_build import BuildOptions

    return BuildOptions(
        onnx=args.onnx, out=args.out, min_batch=args.min_batch, opt_batch=args.opt_batch,
        max_batch=args.max_batch, timing_cache=args.timing_cache,
        version_compatible=args.version_compatible, hardware_compat=args.hardware_compat,
        workspace_mb=args.workspace_mb, sample_inputs=args.sample_inputs, seed=args.seed,
        compare_images=args.compare_images,
    )


def run(args: argparse.Namespace) -> int:
    from sdr_edge.export.engine_compare import CompareError
    from sdr_edge.export.parity import ParityError
    from sdr_edge.export.tensorrt_build import EngineBuildError, build_and_verify
    from sdr_edge.inference.cuda_device import TensorRTUnavailable, require_tensorrt_and_gpu

    try:
        require_tensorrt_and_gpu("`sdr-export trt`")
    except TensorRTUnavailable as exc:
        raise CommandError(str(exc)) from exc
    try:
        doc = build_and_verify(options_from_args(args))
    except (EngineBuildError, CompareError, ParityError) as exc:
        raise CommandError(f"{exc} (nothing was written to {args.out})") from exc
    prof = doc["input"]["profile"]
    print(f"wrote {args.out} (TensorRT {doc['tensorrt_version']}, {doc['precision']}, "
          f"{doc['gpu']['name']} sm_{''.join(map(str, doc['gpu']['compute_capability']))}, "
          f"batch {prof['min'][0]}..{prof['max'][0]}, built in {doc.get('build_seconds')} s "
          f"by {doc['builder']})")
    print(f"  compared on {doc['comparison'].get('inputs_from', '?')}")
    for check in doc["checks"]:
        print(f"  {check['name']}: {check['detail']}")
    return 0
