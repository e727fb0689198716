"""Run an exported model (ONNX or TensorRT engine) on a folder of images.

The runtime follows the file: ONNX models run in ONNX Runtime, TensorRT engines on the GPU.
Images are decoded with OpenCV and preprocessed with the exact evaluation transform of
training; unreadable files are skipped and listed, and throughput is printed at the end.
This path never imports torch for ONNX models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model.onnx or model.engine")
    p.add_argument("--images", required=True, type=Path, help="folder of images (or one image)")
    p.add_argument("--batch", type=int, default=32, help="images per model call")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.model_metadata import MetadataError
    from sdr_edge.inference.cuda_device import TensorRTUnavailable
    from sdr_edge.inference.model_file import ModelFileError
    from sdr_edge.inference.predict import infer_images
    from sdr_edge.inference.runners import open_runner

    if args.batch < 1:
        raise CommandError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    try:
        runner = open_runner(args.model, threads=args.threads)
    except (ModelFileError, MetadataError, TensorRTUnavailable) as exc:
        raise CommandError(str(exc)) from exc
    report = infer_images(runner, args.images, batch=args.batch,
                          progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps({"model": str(args.model), **report.to_dict()}, indent=2))
    else:
        for p in report.predictions:
            what = (f"{p.label}\t{p.score:.4f}" if p.label is not None
                    else f"features[{p.feature_dim}]\tnorm {p.feature_norm:.4f}")
            print(f"{p.path}\t{what}" + (f"\t({p.note})" if p.note else ""))
        for s in report.skipped:
            print(f"skipped {s['path']}: {s['reason']}")
        print(f"{len(report.predictions)} image(s) in {report.seconds_total:.3f} s: "
              f"{report.images_per_s:.1f} images/s end to end, {report.model_images_per_s:.1f} "
              f"images/s in the model ({report.runtime}); {len(report.skipped)} skipped")
    if not report.predictions:
        raise CommandError(f"no readable image under {args.images} "
                           f"({len(report.skipped)} skipped)")
    return 0
