"""Run an exported model (ONNX or TensorRT engine) on images, a video file or a camera.

The runtime follows the file: ONNX models run in ONNX Runtime on the execution provider asked
for with --provider (cpu, cuda, tensorrt or auto; a provider this onnxruntime lacks falls back
with a warning naming it), TensorRT engines on the GPU. The provider actually used is printed
and written to the JSON. Images are decoded with OpenCV and preprocessed with the exact
evaluation transform of training (a raw-input graph from `sdr-export onnx --raw-input` gets
the uint8 images and normalises itself); unreadable files are skipped and listed. --video
reads a file or a camera index with OpenCV and streams one JSON line per frame, then one line
with the throughput. This path never imports torch for ONNX models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model.onnx or model.engine")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", type=Path, help="folder of images (or one image)")
    what.add_argument("--video", metavar="PATH_OR_DEVICE",
                      help="video file (or URL) read with OpenCV, or a camera index such as 0")
    p.add_argument("--provider", default=None, metavar="cpu|cuda|tensorrt|auto",
                   help="ONNX Runtime execution provider, falling back towards cpu when absent "
                   "(auto: tensorrt, cuda, cpu); default cpu for ONNX, TensorRT for engines")
    p.add_argument("--batch", type=int, default=None,
                   help="images (frames) per model call (default 32 for images, 8 for video)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="--video: stop after this many frames (a camera runs until stopped)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON document (--images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> None:
    if args.batch is not None and args.batch < 1:
        raise CommandError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    if args.max_frames is not None:
        if args.video is None:
            raise CommandError("--max-frames applies to --video only")
        if args.max_frames < 1:
            raise CommandError(f"--max-frames must be >= 1, got {args.max_frames}")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.inference.providers import provider_name
    from sdr_edge.inference.runners import open_runner

    _check_args(args)
    provider = provider_name(args.provider) if args.provider is not None else None
    runner = open_runner(args.model, threads=args.threads, provider=provider)
    warnings = list(getattr(runner, "provider_warnings", []))
    if args.video is not None:
        return _run_video(args, runner, warnings)
    return _run_images(args, runner, warnings)


def _run_video(args: argparse.Namespace, runner, warnings: list[str]) -> int:
    from sdr_edge.inference.video import infer_video

    def emit(frame) -> None:
        print(json.dumps(frame.to_dict()), flush=True)

    report = infer_video(runner, args.video, batch=args.batch or 8,
                         max_frames=args.max_frames, on_frame=emit)
    print(json.dumps({"model": str(args.model), **report.to_dict(),
                      "provider_warnings": warnings}), flush=True)
    return 0


def _run_images(args: argparse.Namespace, runner, warnings: list[str]) -> int:
    from sdr_edge.inference.predict import infer_images

    report = infer_images(runner, args.images, batch=args.batch or 32,
                          progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps({"model": str(args.model), **report.to_dict(),
                          "provider_warnings": warnings}, indent=2))
    else:
        for p in report.predictions:
            what = (f"{p.label}\t{p.score:.4f}" if p.label is not None
                    else f"features[{p.feature_dim}]\tnorm {p.feature_norm:.4f}")
            print(f"{p.path}\t{what}" + (f"\t({p.note})" if p.note else ""))
        for s in report.skipped:
            print(f"skipped {s['path']}: {s['reason']}")
        print(f"{len(report.predictions)} image(s) in {report.seconds_total:.3f} s: "
              f"{report.images_per_s:.1f} images/s end to end, {report.model_images_per_s:.1f} "
              f"images/s in the model ({report.runtime}); provider {report.provider}; "
              f"{len(report.skipped)} skipped")
    if not report.predictions:
        raise CommandError(f"no readable image under {args.images} "
                           f"({len(report.skipped)} skipped)")
    return 0
