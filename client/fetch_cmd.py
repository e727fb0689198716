"""Fetch the sub-net for a signature (or a route, or the signature kit) from the registry.

The bundle's Ed25519 signature and every sha256 are checked in memory; only then is it
written to a staging folder swapped in at --out. A tampered or unsigned bundle is refused and
nothing is left in --out. --out must be a new or empty folder or an earlier bundle/kit: a
folder holding anything else is refused, never replaced. The token is the first of --token,
--token-file, $SDR_REGISTRY_TOKEN that is given (the latter two keep it out of the process
list; `sdr_edge.registry_client.resolve_token`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sdr_edge.cli import CommandError, load_key_arg
from sdr_edge.registry_client import TOKEN_ENV
from sdr_edge.routing.transferability import RERANK_METHODS


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
    rerank = parser.add_argument_group(
        "re-ranking on the device (with --signature; needs torch)",
        "download the top M routed sub-nets, run each on local images and keep the best: "
        "rankme and consensus (LogME against the candidates' shared clusters) need no labels; "
        "logme, knn and probe (cross-validated linear probe) need one sub-folder per class in "
        "--images")
    rerank.add_argument("--rerank", choices=RERANK_METHODS,
                        help="score the top-M candidates on --images and keep the best")
    rerank.add_argument("--top-m", type=int, default=8, help="candidates to download (default 8)")
    rerank.add_argument("--images", type=Path, help="local images (class sub-folders for labels)")


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
    from sdr_edge.artifacts.staging import OutputError, check_replaceable_dir, resolve_out
    from sdr_edge.artifacts.transfer import TransferError
    from sdr_edge.registry_client import RegistryError, fetch_bundle, get_kit, resolve_token

    if not getattr(args, "verbose", False):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    token = resolve_token(args.token, args.token_file, file_label="--token-file",
                          hint=f"pass --token or --token-file, or set ${TOKEN_ENV}")
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
    if args.rerank:
        return _run_rerank(args, token, pubkey)
    if args.images is not None:
        raise CommandError("--images is only used with --rerank")
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


def _local_images(folder: Path, size: int, channels: int, needs_labels: bool):
    from sdr_edge.data.sources import load_source

    if not folder.is_dir():
        raise CommandError(f"--images {folder} is not a folder")
    try:
        source = load_source(str(folder), size, channels)
    except (ValueError, OSError) as exc:
        raise CommandError(f"--images {folder}: {exc}") from exc
    if needs_labels and (source.labels is None or len(set(source.labels.tolist())) < 2):
        raise CommandError(f"--images {folder}: logme, knn and probe need labels: one sub-folder per "
                           "class, at least two classes")
    if len(source) < 2:
        raise CommandError(f"--images {folder}: need at least two readable images")
    return source


def _run_rerank(args: argparse.Namespace, token: str, pubkey) -> int:
    """--rerank: top-M candidates verified in memory, scored on local images, one kept."""
    from sdr_edge.artifacts.staging import OutputError
    from sdr_edge.artifacts.transfer import TransferError, write_files_atomically
    from sdr_edge.registry_client import RegistryError, fetch_candidates

    if not args.signature:
        raise CommandError("--rerank needs --signature (a route or the kit has nothing to rank)")
    if args.images is None:
        raise CommandError("--rerank needs --images (the local images to score candidates on)")
    if not 1 <= args.top_m <= 64:
        raise CommandError(f"--top-m must be between 1 and 64, got {args.top_m}")
    try:
        from sdr_edge.routing.device_rerank import (
            candidates_input_shape,
            needs_labels,
            pick_candidate,
        )
    except ImportError as exc:  # a torch-free device install
        raise CommandError(f"{exc} (or fetch the signature route without --rerank)") from exc
    signature = _load_signature(args.signature)
    try:
        candidates = fetch_candidates(args.server, token, signature, pubkey, args.top_m,
                                      cacert=args.cacert)
    except (RegistryError, TransferError) as exc:
        raise CommandError(str(exc)) from exc
    source = _local_images(args.images, *candidates_input_shape(candidates),
                           needs_labels(args.rerank))
    route, files, choice = pick_candidate(candidates, pubkey, source.images, args.rerank,
                                          source.labels)
    try:
        out = write_files_atomically(files, args.out)
    except OutputError as exc:
        raise CommandError(f"--out {exc}") from exc
    downloaded = sum(len(b) for _, fs in candidates for b in fs.values())
    print(json.dumps({
        "route": list(route), "bundle_id": "-".join(str(d) for d in route), "out": str(out),
        "verified": True, "rerank": args.rerank, "signature_rank": choice.index + 1,
        "candidates": [{"route": list(r), "score": s} for (r, _), s in
                       zip(candidates, choice.scores, strict=True)],
        "bytes_downloaded": downloaded, "device_seconds": round(choice.seconds, 3),
        "images": len(source)}))
    return 0
