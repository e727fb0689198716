"""The registry's ASGI app: kit, routing, signed sub-net bundles, health, OpenAPI schema.

Everything expensive happens once in `create_app`: the SDRnet is loaded, the token hashes and
the signing key are read, the kit archive is signed. Requests then only validate, score and
serve files. Route ids become integers validated against the branching before any path is
built; a sub-net is extracted and signed on its first request and served from disk after.
(No `from __future__ import annotations` here: FastAPI must see the endpoints' annotations,
which refer to names local to `create_app`.)
"""

import json
import logging
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sdr_edge.artifacts.atomic import sha256_bytes, sha256_file
from sdr_edge.artifacts.run_dir import SDRNET, load_sdrnet
from sdr_edge.artifacts.signing import load_private_key
from sdr_edge.artifacts.staging import OutputError
from sdr_edge.artifacts.transfer import TAR_MEDIA_TYPE
from sdr_edge.routing.signature import (
    SIGNATURE_FORMAT,
    SIGNATURE_VERSION,
    SUM_TOLERANCE,
    RunIdMismatchError,
    SignatureValidationError,
    check_run_id,
    route_signature,
    served_run_id,
    validate_signature,
)

from .auth import TokenFile, TokensUnavailable
from .cache import BundleCache
from .kit import build_kit_archive
from .limits import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
    BodyLimitMiddleware,
)
from .route_ids import (
    RouteIdError,
    format_route_id,
    parse_route_id,
    route_id_pattern,
)
from .scoring import TopRoutes

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
TOP_SCORES = 5
MAX_TOP = 64  # a device re-ranking the top M on its own images asks for at most this many
ENV_PREFIX = "SDR_REGISTRY_"


class ScoredRoute(BaseModel):
    route: list[int]
    bundle_id: str
    score: float


class RouteOut(BaseModel):
    route: list[int]
    bundle_id: str
    scores: list[ScoredRoute]


class ErrorOut(BaseModel):
    detail: str
    field: str | None = None


class InfoOut(BaseModel):
    branching: list[int]
    num_subnets: int
    input_spec: dict
    sdrnet_sha256: str
    public_key_sha256: str
    kit: bool
    run_id: str | None = None  # what signatures must carry (see sdr_edge.routing.signature)


def default_cache_dir(sdrnet_sha256: str) -> Path:
    """Outside the run dir (which stays as training wrote it), keyed by the SDRnet's hash."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdr-edge" / "registry" / sdrnet_sha256[:16]


def signature_schema(branching: list[int], run_id: str | None = None,
                     run_id_required: bool = False) -> dict:
    """JSON schema of a signature for this SDRnet: exactly what `validate_signature` enforces,
    except that each level must sum to 1 (within SUM_TOLERANCE), which JSON schema cannot say.

    Per level, `prefixItems` fixes the number of probabilities (B_r); a probability is never
    above 1 + SUM_TOLERANCE since none is negative and they sum to 1 within it. When the
    server requires a run id, `run_id` is required and may not be null (`check_run_id`).
    """
    run_id_string = {"type": "string", "pattern": "^[0-9a-f]{16}$"}
    if run_id is not None:
        run_id_string["example"] = run_id
    level = [{"type": "array", "minItems": int(b), "maxItems": int(b),
              "items": {"type": "number", "minimum": 0, "maximum": 1 + SUM_TOLERANCE}}
             for b in branching]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["levels", "count", "run_id"] if run_id_required else ["levels", "count"],
        "properties": {
            "format": {"type": "string", "enum": [SIGNATURE_FORMAT]},
            "version": {"type": "integer", "enum": [SIGNATURE_VERSION]},
            "run_id": {**(run_id_string if run_id_required
                          else {"anyOf": [run_id_string, {"type": "null"}]}),
                       "description": "the run of the kit the signature was computed with; "
                                      "must be this server's (GET /v1/info), else 409"},
            "branching": {"type": "array", "const": list(branching), "example": branching,
                          "description": "optional; when present, the server's branching"},
            "levels": {
                "type": "array", "minItems": len(branching), "maxItems": len(branching),
                "description": "per level, the mean probability of each code digit; each "
                               f"level sums to 1 (within {SUM_TOLERANCE})",
                "prefixItems": level, "items": False,
            },
            "count": {"type": "integer", "minimum": 1},
            "dp_epsilon": {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                     {"type": "null"}]},
        },
    }


def _error(status: int, detail: str, field: str | None = None) -> JSONResponse:
    body: dict = {"detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def create_app(run_dir: str | Path, tokens_file: str | Path, key_path: str | Path,
               cache_dir: str | Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
               max_headers: int = DEFAULT_MAX_HEADERS) -> FastAPI:
    """Load the run's SDRnet, tokens and signing key once; return the registry app."""
    run_dir = Path(run_dir)
    tokens = TokenFile(tokens_file)
    if len(tokens) == 0:
        log.warning("%s holds no tokens: every authenticated request will get 401", tokens_file)
    key = load_private_key(key_path)
    net, spec = load_sdrnet(run_dir)
    branching = list(net.branching)
    sdrnet_sha = sha256_file(run_dir / SDRNET)
    pub_raw = key.public_key().public_bytes_raw()
    provenance = {"run": run_dir.resolve().name, "sdrnet_sha256": sdrnet_sha,
                  "server": "sdr-server serve"}
    top_routes = TopRoutes(branching)
    cache = BundleCache(net, spec, key, cache_dir or default_cache_dir(sdrnet_sha), provenance)
    kit = build_kit_archive(run_dir, key, provenance)
    run_id, run_id_required = served_run_id(run_dir)
    info = InfoOut(branching=branching, num_subnets=net.num_subnets, input_spec=spec.to_dict(),
                   sdrnet_sha256=sdrnet_sha, public_key_sha256=sha256_bytes(pub_raw),
                   kit=kit is not None, run_id=run_id).model_dump()

    app = FastAPI(title="sdr-edge registry", version="1",
                  description="Signature kit, task routing and signed SDR sub-net bundles.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes,
                       max_header_bytes=max_header_bytes, max_headers=max_headers)
    app.state.cache = cache
    bearer = HTTPBearer(auto_error=False, description="a token from `sdr-server token`")
    unauthorized = {"description": "missing or wrong bearer token", "model": ErrorOut}
    unavailable = {"description": "tokens file missing or malformed: no token is trusted",
                   "model": ErrorOut}

    # async on purpose: a sync dependency runs in the thread pool, which cost /v1/route 2.5x
    async def client_name(
            cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        try:
            name = tokens.check(cred.credentials) if cred is not None else None
        except TokensUnavailable:  # fail closed; TokenFile logged the reason when it broke
            raise HTTPException(503, "the registry cannot check tokens right now (its tokens "
                                "file is missing or malformed); try again later",
                                headers={"Retry-After": "5"}) from None
        if name is None:
            raise HTTPException(401, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    Client = Annotated[str, Depends(client_name)]
    # the pattern is documentation (a bad id gets our 404, not FastAPI's 422) and says exactly
    # what parse_route_id accepts for this branching
    RouteIdParam = Annotated[str, PathParam(
        description="route digits joined by '-', one per level",
        json_schema_extra={"pattern": route_id_pattern(branching),
                           "example": format_route_id([0] * len(branching))})]

    @app.get("/healthz", summary="liveness (no authentication)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", response_model=InfoOut, responses={401: unauthorized, 503: unavailable})
    async def get_info(_: Client) -> JSONResponse:
        """Branching, input spec and hashes a client can check before routing."""
        return JSONResponse(info)

    @app.get("/v1/kit", response_class=Response, responses={
        200: {"content": {TAR_MEDIA_TYPE: {}}, "description": "signed kit archive (tar)"},
        401: unauthorized, 404: {"description": "run has no kit", "model": ErrorOut},
        503: unavailable})
    async def get_kit(_: Client) -> Response:
        """The signature kit: a tar of its files plus a signed manifest."""
        if kit is None:
            return _error(404, "this run has no signature kit")
        return Response(kit[0], media_type=TAR_MEDIA_TYPE,
                        headers={"X-Manifest-Sha256": kit[1]})

    @app.post("/v1/route", response_model=RouteOut, responses={
        401: unauthorized, 503: unavailable,
        413: {"description": "body too large", "model": ErrorOut},
        409: {"description": "signature computed with another run's kit (`run_id`)",
              "model": ErrorOut},
        422: {"description": "malformed signature; `field` names the part", "model": ErrorOut}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": signature_schema(branching, run_id, run_id_required)}}}})
    async def post_route(request: Request, _: Client,
                         top: Annotated[int, Query(ge=1, le=MAX_TOP, description=(
                             "how many of the best-scored routes to list in `scores` (a device "
                             "that re-ranks candidates on its own images asks for its M)"))
                         ] = TOP_SCORES) -> JSONResponse:
        """Signature -> the routed sub-net (majority digit per level) and the top scores."""
        body = await request.body()
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            return _error(422, f"signature: not valid JSON ({str(exc)[:80]})", "signature")
        try:
            sig = validate_signature(obj, branching)
            check_run_id(sig, run_id, run_id_required)
        except RunIdMismatchError as exc:  # well-formed, but its digits mean another run's codes
            return _error(409, str(exc), exc.field)
        except SignatureValidationError as exc:
            return _error(422, str(exc), exc.field)
        route = route_signature(sig)
        top = [{"route": list(r), "bundle_id": format_route_id(r), "score": s}
               for r, s in top_routes(sig, top)]
        return JSONResponse({"route": list(route), "bundle_id": format_route_id(route),
                             "scores": top})

    @app.get("/v1/subnets/{route_id}", response_class=FileResponse, responses={
        200: {"content": {TAR_MEDIA_TYPE: {}}, "description": "signed bundle archive (tar)"},
        401: unauthorized, 404: {"description": "no such route", "model": ErrorOut},
        503: unavailable})
    async def get_subnet(route_id: RouteIdParam, _: Client) -> Response:
        """The signed bundle of one sub-net ('1-2-3-0'), extracted on first request."""
        try:
            route = parse_route_id(route_id, branching)
        except RouteIdError as exc:
            return _error(404, str(exc))
        bundle_id = format_route_id(route)
        headers = {"X-Bundle-Id": bundle_id,
                   "Content-Disposition": f'attachment; filename="{bundle_id}.tar"'}
        data = cache.payload(route)
        if data is not None:
            return Response(data, media_type=TAR_MEDIA_TYPE, headers=headers)
        try:
            path = await run_in_threadpool(cache.archive, route)
        except OutputError as exc:  # the cache folder holds files the registry did not write
            log.error("cannot cache sub-net %s: %s", bundle_id, exc)
            return _error(503, f"the registry cannot cache sub-net {bundle_id} right now "
                          "(its cache folder holds files it did not write; see the server log)")
        data = cache.payload(route)
        if data is not None:
            return Response(data, media_type=TAR_MEDIA_TYPE, headers=headers)
        return FileResponse(path, media_type=TAR_MEDIA_TYPE, headers=headers)

    return app


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` / several workers: settings from SDR_REGISTRY_*."""
    import torch

    torch.set_num_threads(1)
    env = os.environ
    try:
        return create_app(env[ENV_PREFIX + "RUN"], env[ENV_PREFIX + "TOKENS"],
                          env[ENV_PREFIX + "KEY"], env.get(ENV_PREFIX + "CACHE") or None,
                          int(env.get(ENV_PREFIX + "MAX_BODY", DEFAULT_MAX_BODY_BYTES)),
                          int(env.get(ENV_PREFIX + "MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES)),
                          int(env.get(ENV_PREFIX + "MAX_HEADERS", DEFAULT_MAX_HEADERS)))
    except KeyError as exc:
        raise RuntimeError(f"registry setting {exc.args[0]} is not set") from exc
