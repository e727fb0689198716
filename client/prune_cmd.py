"""Prune a verified sub-net bundle to a MACs budget (torch-pruning) and sign it with a device key.

The parent bundle must verify under the server's public key (--pubkey). The pruned bundle is
signed with the device's own Ed25519 key (--key; make one with `sdr-server keygen`) and carries
the parent's signed manifest, so the chain back to the server stays checkable. Prints MACs and
parameters before and after as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdr_edge.cli import CommandError, load_key_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="server-signed bundle folder")
    parser.add_argument("--pubkey", required=True, type=Path,
                        help="server public key that the parent bundle must verify under")
    parser.add_argument("--key", required=True, type=Path,
                        help="device private key that signs the pruned bundle")
    parser.add_argument("--macs-ratio", type=float, default=0.5,
                        help="target MACs as a fraction of the parent's, in (0, 1)")
    parser.add_argument("--max-steps", type=int, default=20,
                        help="pruning steps over which channels go up to --max-channel-ratio")
    parser.add_argument("--max-channel-ratio", type=float, default=0.9)
    parser.add_argument("--out", required=True, type=Path, help="pruned bundle folder to write")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.bundle import BundleError
    from sdr_edge.artifacts.signing import SignatureError
    from sdr_edge.artifacts.staging import OutputError, check_replaceable_dir, resolve_out
    from sdr_edge.pruning import PruningError, prune_bundle

    server_pub = load_key_arg(args.pubkey, "--pubkey")
    device_key = load_key_arg(args.key, "--key", private=True)
    if not args.bundle.is_dir():
        raise CommandError(f"bundle folder not found: {args.bundle}")
    if args.out.resolve() == args.bundle.resolve():
        raise CommandError("--out must differ from --bundle")
    try:  # a folder we did not write is refused before minutes of pruning
        check_replaceable_dir(resolve_out(args.out))
    except OutputError as exc:
        raise CommandError(f"--out {exc}") from exc
    try:
        summary = prune_bundle(args.bundle, server_pub, device_key, args.out, args.macs_ratio,
                               max_steps=args.max_steps, max_channel_ratio=args.max_channel_ratio)
    except (BundleError, SignatureError, PruningError, OutputError) as exc:
        raise CommandError(str(exc)) from exc
    summary.pop("channel_widths", None)
    print(json.dumps(summary))
    return 0
