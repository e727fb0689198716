"""Export a signed sub-net bundle to ONNX (fp32, fp16 or int8), checked against PyTorch.

The bundle's signature is verified first; the model is exported with torch.onnx's dynamo
exporter, converted, compared with PyTorch in ONNX Runtime on real images, and written only if
every check passes (with a sidecar JSON holding its input spec, route and check results).
`--raw-input` gives a graph that takes uint8 N x H x W x C images at the model's size and
normalises inside (for camera pipelines), checked against the normalised-input graph.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.cli import CommandError, load_key_arg


def _batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes 'dynamic' or a positive integer, "
                                         f"not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch must be >= 1, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (signed)")
    p.add_argument("--pubkey", required=True, type=Path, help="server public key (PEM)")
    p.add_argument("--out", required=True, type=Path, help="output model.onnx")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--calib-images", type=Path, help="folder of calibration images (int8)")
    p.add_argument("--calib-source", help="calibration source instead: builtin:digits, "
                   "fashion-mnist[:train|:test] or a folder")
    p.add_argument("--calib-limit", type=int, default=512, help="calibration images used")
    p.add_argument("--eval-source", help="labelled source for the parity/accuracy checks")
    p.add_argument("--eval-limit", type=int, default=1000, help="evaluation images used")
    p.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                   help="dynamic batch axis (default) or a fixed batch size")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    p.add_argument("--int8-target", choices=("cpu", "tensorrt"), default="cpu",
                   help="int8 activations: uint8 asymmetric for ONNX Runtime on CPUs (default), "
                   "int8 symmetric for TensorRT")
    p.add_argument("--int8-quantize-all", action="store_true",
                   help="also quantize the first and last weighted layer (kept fp32 by default)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="override the check's bound (fp32/fp16 error, int8 min agreement)")
    p.add_argument("--raw-input", action="store_true",
                   help="take uint8 N x H x W x C images and normalise inside the graph "
                   "(Cast, Sub, Div, Transpose) instead of float32 N x C x H x W normalised")
    p.add_argument("--seed", type=int, default=0, help="seed for image subsets")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.export.parity import ParityError
    from sdr_edge.export.pipeline import ExportOptions, export_bundle

    pubkey = load_key_arg(args.pubkey, "--pubkey")
    opts = ExportOptions(
        precision=args.precision, batch=args.batch, opset=args.opset,
        calib_images=args.calib_images, calib_source=args.calib_source,
        calib_limit=args.calib_limit, eval_source=args.eval_source, eval_limit=args.eval_limit,
        int8_target=args.int8_target, int8_quantize_all=args.int8_quantize_all,
        tolerance=args.tolerance, seed=args.seed,
        progress=not args.no_progress, raw_input=args.raw_input,
    )
    try:
        result = export_bundle(args.bundle, pubkey, args.out, opts)
    except ParityError as exc:
        raise CommandError(f"{exc} (nothing was written to {args.out})") from exc
    layout = result.metadata.extra.get("input_layout", "float32_nchw_normalized")
    print(f"wrote {result.path} ({result.metadata.precision}, batch {result.metadata.batch}, "
          f"input {layout}, "
          f"sha256 {result.sha256[:16]}…) and {result.sidecar}")
    for check in result.checks:
        print(f"  {check.describe()}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
