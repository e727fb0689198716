"""HTTP client of the registry: token, kit, routing and verified bundle download (httpx).

Used by `sdr-client fetch`, the client agent and the Flower server (the FastAPI server itself
is the `server.registry` app). Downloads are read into
memory with a size cap, unpacked only as plain files, verified (Ed25519 signature, every
sha256, nothing unlisted) and only then written to a staging folder swapped into place: a
refused download leaves nothing in the output folder, and a folder this project did not write
is never replaced.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.artifacts.staging import check_replaceable_dir, resolve_out
from sdr_edge.artifacts.transfer import (
    MAX_ARCHIVE_BYTES,
    TransferError,
    unpack_files,
    verify_bundle_archive,
    verify_kit_archive,
    write_files_atomically,
)
from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.route_ids import format_route_id, parse_route_id

DEFAULT_TIMEOUT = 60.0
TOKEN_ENV = "SDR_REGISTRY_TOKEN"


class RegistryError(SdrEdgeError, RuntimeError):
    """The registry could not be reached or answered with an error status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TokenError(SdrEdgeError, ValueError):
    """No usable bearer token: the message names the file or the ways to give one."""


def resolve_token(token: str | None = None, token_file: str | Path | None = None,
                  env: Mapping[str, str] | None = None, *, file_label: str = "token file",
                  hint: str = f"pass a token or a token file, or set ${TOKEN_ENV}") -> str:
    """The registry's bearer token, from the first source given, in this one order:

    1. `token` (an explicit value, e.g. --token; empty counts as not given),
    2. `token_file` (its text, stripped; it must exist and hold one non-empty line),
    3. `$SDR_REGISTRY_TOKEN` in `env` (os.environ by default).

    A source that is given but unusable is an error, never skipped in favour of the next one
    (a typo in a token-file path must not silently pick up another token from the
    environment). `file_label` names the file's setting in messages (e.g. '--token-file',
    'registry.token_file'); `hint` says how to give a token when there is none.
    """
    env = os.environ if env is None else env
    if token:
        return _check_token(token, "the token")
    if token_file is not None and str(token_file) != "":
        path = Path(token_file).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise TokenError(f"{file_label} {path} {what}")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"{file_label} {path} cannot be read: {exc}") from exc
        if not text:
            raise TokenError(f"{file_label} {path} is empty")
        return _check_token(text, f"{file_label} {path}")
    if env.get(TOKEN_ENV, "").strip():
        return _check_token(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    raise TokenError(f"no registry token: {hint}")


def _check_token(token: str, source: str) -> str:
    # it goes into an HTTP header: a second line or a non-ASCII character would fail there
    # with a far less readable error (or split the header)
    if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenError(f"{source} is not a single-line ASCII token (spaces, line breaks and "
                         "control characters cannot go into the Authorization header)")
    return token


def _verify_option(cacert: str | Path | None) -> ssl.SSLContext | bool:
    if cacert is None:
        return True
    if not Path(cacert).is_file():
        raise FileNotFoundError(f"CA certificate not found: {cacert}")
    return ssl.create_default_context(cafile=str(cacert))


def make_client(url: str, token: str, cacert: str | Path | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> httpx.Client:
    """An httpx client with the bearer token, the base URL and (optionally) a private CA."""
    if not url.startswith(("http://", "https://")):
        raise RegistryError(f"registry URL must start with http:// or https://, got {url!r}")
    return httpx.Client(base_url=url.rstrip("/"), timeout=timeout, verify=_verify_option(cacert),
                        headers={"Authorization": f"Bearer {token}"})


def _pubkey(pubkey: Ed25519PublicKey | str | Path) -> Ed25519PublicKey:
    return pubkey if isinstance(pubkey, Ed25519PublicKey) else load_public_key(pubkey)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text[:200]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)[:200]


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise RegistryError(f"{what}: HTTP {response.status_code}: {_detail(response)}",
                            response.status_code)


def _download(client: httpx.Client, path: str, what: str, max_bytes: int) -> bytes:
    try:
        with client.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response, what)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise RegistryError(f"{what}: {declared} bytes exceeds the limit of {max_bytes}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise RegistryError(f"{what}: download exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise RegistryError(f"{what}: cannot reach {client.base_url}: {exc}") from exc
    return b"".join(chunks)


def _signature_obj(signature: Any) -> dict:
    if hasattr(signature, "to_dict"):
        return signature.to_dict()
    if isinstance(signature, str | bytes):
        return json.loads(signature)
    if isinstance(signature, dict):
        return signature
    raise TypeError(f"expected a Signature, dict or JSON text, got {type(signature).__name__}")


def post_route(url: str, token: str, signature: Any, cacert: str | Path | None = None,
               top: int | None = None) -> dict:
    """POST /v1/route: {'route': [...], 'bundle_id': '1-2-3-0', 'scores': [...]} (`top` best)."""
    with make_client(url, token, cacert) as client:
        return _post_route(client, _signature_obj(signature), top)


def _post_route(client: httpx.Client, obj: dict, top: int | None = None) -> dict:
    try:
        response = client.post("/v1/route", json=obj,
                               params=None if top is None else {"top": int(top)})
    except httpx.HTTPError as exc:
        raise RegistryError(f"POST /v1/route: cannot reach {client.base_url}: {exc}") from exc
    _raise_for(response, "POST /v1/route")
    return response.json()


def _bundle_id(route_or_signature: Any, client: httpx.Client) -> tuple[str, tuple[int, ...]]:
    if isinstance(route_or_signature, str) and not route_or_signature.lstrip().startswith("{"):
        # strict: the text goes into the URL path (RouteIdError before any request)
        route = parse_route_id(route_or_signature)
        return format_route_id(route), route
    if isinstance(route_or_signature, Sequence) and not isinstance(route_or_signature, str | bytes):
        route = tuple(int(d) for d in route_or_signature)
        return format_route_id(route), route
    answer = _post_route(client, _signature_obj(route_or_signature))
    return answer["bundle_id"], tuple(int(d) for d in answer["route"])


def fetch_bundle(url: str, token: str, route_or_signature: Any,
                 pubkey: Ed25519PublicKey | str | Path, out_dir: str | Path,
                 cacert: str | Path | None = None, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Route (tuple, '1-2-3-0') or signature -> verified bundle folder at out_dir.

    out_dir must be new, empty or an earlier bundle/kit (OutputError otherwise, before any
    download); an earlier one is replaced atomically.
    """
    key = _pubkey(pubkey)
    check_replaceable_dir(resolve_out(out_dir))
    with make_client(url, token, cacert) as client:
        bundle_id, route = _bundle_id(route_or_signature, client)
        files = _verified_bundle(client, bundle_id, route, key, max_bytes)
    return write_files_atomically(files, out_dir)


def _verified_bundle(client: httpx.Client, bundle_id: str, route: tuple[int, ...],
                     key: Ed25519PublicKey, max_bytes: int) -> dict[str, bytes]:
    """GET one bundle, verify it in memory and check that it is the route asked for."""
    data = _download(client, f"/v1/subnets/{bundle_id}", f"GET /v1/subnets/{bundle_id}",
                     max_bytes)
    files = unpack_files(data)
    manifest = verify_bundle_archive(files, key)
    if tuple(manifest.get("route", ())) != route:
        raise TransferError(f"bundle refused: it is for route {manifest.get('route')}, "
                            f"requested {list(route)}")
    return files


def fetch_candidates(url: str, token: str, signature: Any,
                     pubkey: Ed25519PublicKey | str | Path, top_m: int,
                     cacert: str | Path | None = None, max_bytes: int = MAX_ARCHIVE_BYTES
                     ) -> list[tuple[tuple[int, ...], dict[str, bytes]]]:
    """The top-M routes for a signature, each bundle downloaded and verified in memory (best
    routing score first); nothing is written: the caller keeps one (`write_files_atomically`)."""
    key = _pubkey(pubkey)
    out = []
    with make_client(url, token, cacert) as client:
        answer = _post_route(client, _signature_obj(signature), top_m)
        for row in answer["scores"][:top_m]:
            route = tuple(int(d) for d in row["route"])
            bundle_id = format_route_id(route)
            out.append((route, _verified_bundle(client, bundle_id, route, key, max_bytes)))
    return out


def get_kit(url: str, token: str, pubkey: Ed25519PublicKey | str | Path, out_dir: str | Path,
            cacert: str | Path | None = None, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """GET /v1/kit -> verified signature-kit folder at out_dir (same --out rule as a bundle)."""
    key = _pubkey(pubkey)
    check_replaceable_dir(resolve_out(out_dir))
    with make_client(url, token, cacert) as client:
        data = _download(client, "/v1/kit", "GET /v1/kit", max_bytes)
    files = unpack_files(data)
    verify_kit_archive(files, key)
    return write_files_atomically(files, out_dir)


def get_info(url: str, token: str, cacert: str | Path | None = None) -> dict:
    """GET /v1/info: branching, input spec, SDRnet and public-key hashes."""
    with make_client(url, token, cacert) as client:
        try:
            response = client.get("/v1/info")
        except httpx.HTTPError as exc:
            raise RegistryError(f"GET /v1/info: cannot reach {url}: {exc}") from exc
        _raise_for(response, "GET /v1/info")
        return response.json()
