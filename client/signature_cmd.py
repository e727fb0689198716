"""Describe local images with the signature kit (ONNX Runtime only, no torch): signature.json.

The signature is each routing level's mean digit probabilities, the image count and the run
id of the kit, a few hundred bytes. `--dp-epsilon E` releases an E-differentially private
signature instead (Laplace noise on the per-level sums and the count; see
sdr_edge.routing.privacy).

The kit is code this device runs on its own images, so it is verified before it runs:
`--pubkey server.pub` checks the registry's signed manifest and every file's sha256 (a kit
fetched with `sdr-client fetch --kit`). There is no silent fallback: without a key the command
refuses, unless `--insecure-no-verify` says so explicitly (for a kit you built yourself, e.g.
RUN_DIR/kit on the training machine), and then it warns on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sdr_edge.cli import CommandError, load_key_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kit", required=True, type=Path, help="signature kit folder")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--pubkey", type=Path, default=None,
                       help="the registry's public key (server.pub): verify the kit's signed "
                            "manifest and checksums before running it (required)")
    trust.add_argument("--insecure-no-verify", action="store_true",
                       help="run an unsigned kit without verifying it (a kit you built yourself)")
    parser.add_argument("--images", required=True, type=Path, help="folder of local images")
    parser.add_argument("--out", required=True, type=Path, help="signature JSON to write")
    parser.add_argument("--dp-epsilon", type=float, default=None,
                        help="privacy budget: release an epsilon-DP signature")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.atomic import atomic_write_text
    from sdr_edge.routing.kit_runtime import KitError, KitRunner, compute_signature

    if args.pubkey is None and not args.insecure_no_verify:
        raise CommandError("--pubkey is required: the registry's public key (server.pub) "
                           "verifies the kit before it runs (--insecure-no-verify runs an "
                           "unsigned kit you built yourself)")
    if args.dp_epsilon is not None and not (math.isfinite(args.dp_epsilon) and args.dp_epsilon > 0):
        raise CommandError(f"--dp-epsilon must be a positive number, got {args.dp_epsilon}")
    if args.threads < 1 or args.batch_size < 1:
        raise CommandError("--threads and --batch-size must be at least 1")
    if not args.images.is_dir():
        raise CommandError(f"image folder not found: {args.images}")
    pubkey = load_key_arg(args.pubkey, "--pubkey") if args.pubkey is not None else None
    skipped: list[Path] = []
    try:
        runner = KitRunner(args.kit, threads=args.threads, pubkey=pubkey)
        if pubkey is None:
            print(f"sdr-client signature: warning: {args.kit} runs unverified "
                  "(--insecure-no-verify): a tampered kit would go unnoticed", file=sys.stderr)
        sig = compute_signature(runner, args.images, args.dp_epsilon, batch_size=args.batch_size,
                                skipped=skipped)
    except KitError as exc:
        raise CommandError(str(exc)) from exc
    if sig.run_id is None:
        print(f"sdr-client signature: warning: {args.kit} records no run id (a kit made before "
              "run ids): a registry whose kit records one refuses this signature",
              file=sys.stderr)
    text = sig.to_json()
    atomic_write_text(args.out, text + "\n")
    print(json.dumps({"out": str(args.out), "count": sig.count, "skipped": len(skipped),
                      "dp_epsilon": sig.dp_epsilon, "run_id": sig.run_id,
                      "kit_verified": runner.verified, "bytes": len(text)}))
    return 0
