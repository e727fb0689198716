"""Fetch the sub-net for a signature (or a route, or the signature kit) from the registry.

The bundle's Ed25519 signature and every sha256 are checked in memory; only then is it
written to a staging folder swapped in at --out. A tampered or unsigned bundle is refused and
nothing is left in --out. --out must be a new or empty folder or an earlier bundle/kit: a
folder holding anything else is refused, never replaced. The token may come from --token, --token-file or $SDR_REGISTRY_TOKEN
(the latter two keep it out of the process list).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from client.cli_common import CommandError, load_key_arg

TOKEN_ENV = "SDR_REGISTRY_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="registry URL, e.g. https://host:8080")
    parser.add_argument("--token", help=f"bearer token (or --token-file, or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--signature", type=Path, help="signature.json from sdr-client signature")
    what.add_argument("--route", help="a route id such as 1-2-3-0 (skips routing)")
    what.add_argument("--kit", action="store_true",
                      help="fetch the signature kit (verified like a bundle) instead")
    parser.add_argument("--pubkey", required=True, type=Path, help="the server's server.pub")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--cacert", type=Path, help="CA certificate of a private HTTPS server")


def resolve_token(token: str | None, token_file: Path | None) -> str:
    """The token from the flag, the file or the environment, in that order."""
    if token:
        return token
    if token_file is not None:
        if not token_file.is_file():
            raise CommandError(f"--token-file {token_file} does not exist")
        text = token_file.read_text(encoding="utf-8").strip()
        if text:
            return text
        raise CommandError(f"--token-file {token_file} is empty")
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    raise CommandError(f"no token: pass --token, --token-file or set ${TOKEN_ENV}")


def _load_signature(path: Path) -> dict:
    from sdr_edge.routing.signature import SignatureValidationError, validate_signature

    if not path.is_file():
        raise CommandError(f"--signature {path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        validate_signature(obj)
    except (ValueError, UnicodeDecodeError) as exc:
        field = f" (field {exc.field})" if isinstance(exc, SignatureValidationError) else ""
        raise CommandError(f"{path} is not a valid signature{field}: {exc}") from exc
    return obj


def run(args: argparse.Namespace) -> int:
    from client.registry_client import RegistryError, fetch_bundle, get_kit
    from sdr_edge.artifacts.staging import OutputError, check_replaceable_dir, resolve_out
    from sdr_edge.artifacts.transfer import TransferError

    if not getattr(args, "verbose", False):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    token = resolve_token(args.token, args.token_file)
    pubkey = load_key_arg(args.pubkey, "--pubkey")
    try:  # refuse a folder we did not write before downloading anything
        check_replaceable_dir(resolve_out(args.out))
    except OutputError as exc:
        raise CommandError(f"--out {exc}") from exc
    if args.kit:
        try:
            out = get_kit(args.server, token, pubkey, args.out, cacert=args.cacert)
        except (RegistryError, TransferError, OutputError) as exc:
            raise CommandError(str(exc)) from exc
        print(json.dumps({"kit": str(out), "verified": True}))
        return 0
    target = _load_signature(args.signature) if args.signature else args.route
    try:
        out = fetch_bundle(args.server, token, target, pubkey, args.out, cacert=args.cacert)
    except (RegistryError, TransferError, OutputError) as exc:
        raise CommandError(str(exc)) from exc
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    route = "-".join(str(d) for d in manifest["route"])
    print(json.dumps({"route": manifest["route"], "bundle_id": route, "out": str(out),
                      "bytes": size, "verified": True}))
    return 0
