"""Serve the registry: signature kit, routing and signed sub-net bundles over HTTP(S).

Bearer tokens come from a tokens file of sha256 hashes (`sdr-server token`); bundles are
signed with the key from `sdr-server keygen`. Sub-nets are extracted on first request and
cached on disk (--cache-dir, default ~/.cache/sdr-edge/registry/<sdrnet hash>).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sdr_edge.cli import CommandError

from .registry.limits import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory of sdr-server train")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tokens", required=True, type=Path, help="tokens file (sha256 hashes)")
    parser.add_argument("--key", type=Path, default=Path("server.key"),
                        help="Ed25519 private key that signs bundles (default: ./server.key)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where bundles are cached")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) to serve HTTPS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024,
                        help="largest request body accepted (413 above; default 65536)")
    parser.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                        help="largest request head (request line + header fields), checked "
                             "before authentication (431 above; default "
                             f"{DEFAULT_MAX_HEADER_BYTES})")
    parser.add_argument("--max-headers", type=int, default=DEFAULT_MAX_HEADERS,
                        help=f"most header fields in a request (431 above; default "
                             f"{DEFAULT_MAX_HEADERS})")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def _check(args: argparse.Namespace) -> None:
    for flag, path in (("--run", args.run), ("--tokens", args.tokens), ("--key", args.key)):
        if not path.exists():
            raise CommandError(f"{flag} {path} does not exist")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            raise CommandError(f"{flag} {path} does not exist")
    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is not a TCP port")
    for flag, value in (("--workers", args.workers), ("--max-body-bytes", args.max_body_bytes),
                        ("--max-header-bytes", args.max_header_bytes),
                        ("--max-headers", args.max_headers)):
        if value < 1:
            raise CommandError(f"{flag} must be positive, got {value}")
    if args.max_header_bytes < 1024:
        raise CommandError(f"--max-header-bytes {args.max_header_bytes} is too small for a "
                           "request with a bearer token (at least 1024)")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch
    import uvicorn

    from sdr_edge.artifacts.run_dir import RunDirError
    from sdr_edge.artifacts.signing import SignatureError

    from .registry.app import ENV_PREFIX, create_app
    from .registry.auth import TokenFileError
    from .registry.limits import header_limited_protocol

    torch.set_num_threads(1)  # extraction is tiny; leave the cores to request handling
    # a bounded request head, answered with 431 before the app (and so auth) runs
    http = header_limited_protocol(args.max_header_bytes, args.max_headers)
    options = dict(host=args.host, port=args.port, access_log=args.access_log, http=http,
                   log_level="info", ssl_certfile=args.tls_cert and str(args.tls_cert),
                   ssl_keyfile=args.tls_key and str(args.tls_key), timeout_graceful_shutdown=5)
    try:
        if args.workers == 1:
            app = create_app(args.run, args.tokens, args.key, args.cache_dir, args.max_body_bytes,
                             args.max_header_bytes, args.max_headers)
            uvicorn.run(app, **options)
        else:
            os.environ.update({ENV_PREFIX + "RUN": str(args.run.resolve()),
                               ENV_PREFIX + "TOKENS": str(args.tokens.resolve()),
                               ENV_PREFIX + "KEY": str(args.key.resolve()),
                               ENV_PREFIX + "CACHE": str(args.cache_dir.resolve())
                               if args.cache_dir else "",
                               ENV_PREFIX + "MAX_BODY": str(args.max_body_bytes),
                               ENV_PREFIX + "MAX_HEADER_BYTES": str(args.max_header_bytes),
                               ENV_PREFIX + "MAX_HEADERS": str(args.max_headers)})
            uvicorn.run(f"{__package__}.registry.app:app_from_env", factory=True,
                        workers=args.workers, **options)
    except (RunDirError, TokenFileError, SignatureError) as exc:
        raise CommandError(str(exc)) from exc
    return 0
