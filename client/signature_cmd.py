"""Describe local images with the signature kit (ONNX Runtime only, no torch): signature.json.

The signature is each routing level's mean digit probabilities plus the image count, a few
hundred bytes. `--dp-epsilon E` releases an E-differentially private signature instead
(Laplace noise on the per-level sums and the count; see sdr_edge.routing.privacy).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from client.cli_common import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kit", required=True, type=Path, help="signature kit folder")
    parser.add_argument("--images", required=True, type=Path, help="folder of local images")
    parser.add_argument("--out", required=True, type=Path, help="signature JSON to write")
    parser.add_argument("--dp-epsilon", type=float, default=None,
                        help="privacy budget: release an epsilon-DP signature")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.atomic import atomic_write_text
    from sdr_edge.routing.kit_runtime import KitError, compute_signature

    if args.dp_epsilon is not None and not (math.isfinite(args.dp_epsilon) and args.dp_epsilon > 0):
        raise CommandError(f"--dp-epsilon must be a positive number, got {args.dp_epsilon}")
    if args.threads < 1 or args.batch_size < 1:
        raise CommandError("--threads and --batch-size must be at least 1")
    if not args.images.is_dir():
        raise CommandError(f"image folder not found: {args.images}")
    skipped: list[Path] = []
    try:
        sig = compute_signature(args.kit, args.images, args.dp_epsilon, threads=args.threads,
                                batch_size=args.batch_size, skipped=skipped)
    except KitError as exc:
        raise CommandError(str(exc)) from exc
    text = sig.to_json()
    atomic_write_text(args.out, text + "\n")
    print(json.dumps({"out": str(args.out), "count": sig.count, "skipped": len(skipped),
                      "dp_epsilon": sig.dp_epsilon, "bytes": len(text)}))
    return 0
