"""Make the server's Ed25519 key pair (server.key signs bundles, server.pub goes to clients)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from client.cli_common import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for server.key / server.pub")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.signing import generate_keypair, load_public_key

    private, public = args.out / "server.key", args.out / "server.pub"
    if private.exists() and not args.force:
        raise CommandError(f"{private} already exists; pass --force to replace it (clients "
                           "holding the old server.pub will refuse new bundles)")
    args.out.mkdir(parents=True, exist_ok=True)
    generate_keypair(private, public)
    raw = load_public_key(public).public_bytes_raw()
    print(f"wrote {private} (keep secret, mode 0600) and {public}")
    print(f"public key sha256: {hashlib.sha256(raw).hexdigest()}")
    return 0
