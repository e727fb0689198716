"""Make the server's Ed25519 key pair (server.key signs bundles, server.pub goes to clients)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for server.key / server.pub")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")


def _is_ours(path: Path, private: bool) -> bool:
    """Whether `path` holds the kind of key this command writes (an Ed25519 PEM key)."""
    from sdr_edge.artifacts.signing import SignatureError, load_private_key, load_public_key

    try:
        (load_private_key if private else load_public_key)(path)
    except (SignatureError, ValueError, OSError):
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.signing import generate_keypair, load_public_key

    if args.out.is_symlink() or (args.out.exists() and not args.out.is_dir()):
        raise CommandError(f"--out {args.out} exists and is not a folder")
    private, public = args.out / "server.key", args.out / "server.pub"
    existing = [p for p in (private, public) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise CommandError(f"{existing[0]} already exists; pass --force to replace it (clients "
                           "holding the old server.pub will refuse new bundles)")
    for path in existing:  # --force replaces our own keys, never someone else's file
        if path.is_symlink() or not _is_ours(path, private=path == private):
            raise CommandError(f"{path} is not an Ed25519 key written by keygen; refusing to "
                               "replace it even with --force (move it away or pick another --out)")
    args.out.mkdir(parents=True, exist_ok=True)
    generate_keypair(private, public)
    raw = load_public_key(public).public_bytes_raw()
    print(f"wrote {private} (keep secret, mode 0600) and {public}")
    print(f"public key sha256: {hashlib.sha256(raw).hexdigest()}")
    return 0
