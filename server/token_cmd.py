"""Create a registry bearer token: its sha256 is appended to TOKENS_FILE, the token printed once."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", required=True, type=Path, help="tokens file (created if absent)")
    parser.add_argument("--name", required=True, help="who the token is for (unique in the file)")


def run(args: argparse.Namespace) -> int:
    from .registry.auth import TokenFileError, create_token

    if args.tokens.is_symlink() or (args.tokens.exists() and not args.tokens.is_file()):
        raise CommandError(f"--tokens {args.tokens} is not a regular file; refusing to replace it")
    try:
        token = create_token(args.tokens, args.name)
    except TokenFileError as exc:
        raise CommandError(str(exc)) from exc
    print(token)
    return 0
