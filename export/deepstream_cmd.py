"""Write a DeepStream Gst-nvinfer config, labels file and model folder for an ONNX model.

nvinfer's net-scale-factor, offsets, colour format, input dims, network mode (fp32, fp16,
int8) and batch size are derived from the model's graph and metadata; a classifier gets a
Softmax appended so that nvinfer's classifier-threshold reads probabilities. The output folder
is staged and swapped in; only an earlier output of this command is replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, type=Path, help="model.onnx from `sdr-export onnx`")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, empty or ours)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="nvinfer network-mode (default: the model's precision; int8 needs a "
                   "graph exported with --int8-target tensorrt)")
    p.add_argument("--batch", type=int, default=1, help="nvinfer batch-size")
    p.add_argument("--process-mode", choices=("primary", "secondary"), default="primary",
                   help="full frames (primary) or objects found by another GIE (secondary)")
    p.add_argument("--gie-id", type=int, default=1, help="gie-unique-id")
    p.add_argument("--gpu-id", type=int, default=0, help="gpu-id")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="classifier-threshold on the top class probability")
    p.add_argument("--max-scale-error", type=float, default=0.0,
                   help="accept this relative error of the one net-scale-factor when the "
                   "model's std differs per channel (refused by default)")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.export.deepstream import DeepStreamOptions, export_deepstream

    opts = DeepStreamOptions(
        precision=args.precision, batch=args.batch, process_mode=args.process_mode,
        gie_id=args.gie_id, gpu_id=args.gpu_id, threshold=args.threshold,
        max_scale_error=args.max_scale_error,
    )
    result = export_deepstream(args.onnx, args.out, opts)
    p = result.properties
    print(f"wrote {result.config_path} (network-mode {p['network-mode']}, batch-size "
          f"{p['batch-size']}, net-scale-factor {p['net-scale-factor']}, offsets "
          f"{p['offsets']}), {result.model_path.name}"
          + (f" and {result.labels_path.name}" if result.labels_path else ""))
    return 0
