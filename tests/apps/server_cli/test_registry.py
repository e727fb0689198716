"""The registry as a real `sdr-server serve` process on loopback: auth, limits, errors, routing."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from helpers_registry import serve_registry
from helpers_rundir import TINY_BRANCHING, shared_tiny_run

from sdr_edge.routing.signature import route_signature, run_id_of, validate_signature

MAX_BODY = 4096
pytestmark = pytest.mark.slow  # every test here talks to a real server process
SERVED: dict[str, str | None] = {}  # the served run's id (signatures must carry it)


def signature(levels=None, **extra) -> dict:
    if levels is None:
        levels = [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1],
                  [0.0, 0.0, 1.0, 0.0]]
    return {"format": "sdr-signature", "version": 1, "branching": list(TINY_BRANCHING),
            "levels": levels, "count": 12, "run_id": SERVED.get("run_id"), **extra}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    SERVED["run_id"] = run_id_of(run_dir)
    with serve_registry(run_dir, tmp_path_factory.mktemp("registry"),
                        ("--max-body-bytes", str(MAX_BODY))) as reg:
        yield reg


@pytest.fixture(scope="module")
def client(registry):
    with httpx.Client(base_url=registry.url, headers=registry.auth, timeout=30) as c:
        yield c


def raw_get(registry, path: str, token: str | None) -> tuple[int, dict]:
    """GET with the path sent byte for byte (no client-side normalisation of '..')."""
    parts = urlsplit(registry.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        conn.close()


def test_healthz_needs_no_token(registry):
    assert httpx.get(f"{registry.url}/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sdr_wrong"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"},
                                     {"Authorization": "Bearer"}])
def test_401_without_or_with_wrong_token(registry, headers):
    for method, path in [("GET", "/v1/info"), ("GET", "/v1/kit"), ("POST", "/v1/route"),
                         ("GET", "/v1/subnets/0-0-0-0")]:
        r = httpx.request(method, registry.url + path, headers=headers,
                          json=signature() if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


def test_413_for_declared_and_streamed_oversized_bodies(registry, client):
    big = json.dumps(signature(pad="x" * (2 * MAX_BODY)))
    r = client.post("/v1/route", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(8):
            yield b" " * 1024

    r = client.post("/v1/route", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/route", json=signature()).status_code == 200  # still serving


MALFORMED = [
    ("wrong level length", signature([[0.5, 0.5, 0.0], [0.7, 0.1, 0.1, 0.1],
                                      [0.25] * 4, [0.25] * 4]), "levels[0]"),
    ("wrong number of levels", signature([[0.25] * 4] * 3), "levels"),
    ("NaN", signature([[0.25] * 4, [0.25] * 4, [0.5, float("nan"), 0.25, 0.25],
                       [0.25] * 4]), "levels[2][1]"),
    ("negative", signature([[0.25] * 4, [0.25] * 4, [0.25] * 4,
                            [0.75, -0.25, 0.25, 0.25]]), "levels[3][1]"),
    ("not summing to one", signature([[0.25] * 4, [0.3, 0.3, 0.3, 0.3], [0.25] * 4,
                                      [0.25] * 4]), "levels[1]"),
    ("count", signature(count=0), "count"),
    ("branching", signature(branching=[4, 4, 4, 8]), "branching"),
    ("unknown field", signature(extra_field=1), "extra_field"),
]


@pytest.mark.parametrize("name,body,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_422_names_the_field(client, name, body, field):
    text = json.dumps(body)  # json.dumps writes NaN as the bare token, as a sloppy client would
    if name == "count":
        text = text.replace('"count": 12', '"count": 0')
    r = client.post("/v1/route", content=text, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert r.json()["detail"].startswith(field)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 2000 + b"]" * 2000, b""])
def test_422_for_undecodable_bodies(client, body):
    r = client.post("/v1/route", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["field"] == "signature"


def test_route_is_the_majority_and_scores_are_ranked(client):
    body = signature()
    r = client.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = route_signature(validate_signature(body, TINY_BRANCHING))
    assert tuple(answer["route"]) == expected == (3, 0, 1, 2)
    assert answer["bundle_id"] == "3-0-1-2"
    scores = [s["score"] for s in answer["scores"]]
    assert answer["scores"][0]["route"] == answer["route"]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert np.isclose(scores[0], sum(np.log(max(level)) for level in body["levels"]))


@pytest.mark.parametrize("route_id", [
    "4-0-0-0", "0-0-0", "0-0-0-0-0", "01-0-0-0", "-1-0-0-0", "1-2-3-x", "1--2-3", "1-2-3-",
    "99999999999999999999-0-0-0", "..", "%2e%2e", "..%2f..%2fserver.key", "%2Fetc%2Fpasswd",
    "0-0-0-0%00", "0-0-0-0.tar", "%200-0-0-0", "%2e%2e%2f%2e%2e%2fcreds%2fserver.key",
])
def test_404_for_unknown_or_traversal_route_ids(registry, route_id):
    before = sorted(p.name for p in registry.cache_dir.iterdir())
    status, body = raw_get(registry, f"/v1/subnets/{route_id}", registry.token)
    assert status == 404, (route_id, status, body)
    assert sorted(p.name for p in registry.cache_dir.iterdir()) == before


def test_raw_traversal_paths_never_reach_the_files(registry):
    for path in ["/v1/subnets/../../creds/server.key", "/v1/subnets/../kit",
                 "/v1/subnets//etc/passwd", "/v1/subnets/0-0-0-0/../../creds/tokens.txt"]:
        status, _ = raw_get(registry, path, registry.token)
        assert status == 404, path


def test_concurrent_first_requests_extract_once(registry):
    route_id = "2-3-1-0"
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def get():
        r = httpx.get(f"{registry.url}/v1/subnets/{route_id}", headers=registry.auth, timeout=60)
        with lock:
            results.append((r.status_code, r.content))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 8
    assert len({body for _, body in results}) == 1
    assert registry.log().count(f"extracted and signed sub-net {route_id}") == 1
    assert (registry.cache_dir / route_id / "manifest.sig").is_file()


def test_info_and_openapi(client):
    info = client.get("/v1/info").json()
    assert info["branching"] == list(TINY_BRANCHING) and info["num_subnets"] == 256
    schema = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/kit", "/v1/route", "/v1/subnets/{route_id}"} <= set(schema["paths"])
    body = schema["paths"]["/v1/route"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["levels"]["minItems"] == len(TINY_BRANCHING)


def test_tokens_added_or_revoked_apply_without_restart(registry):
    import time

    from sdr_edge_server.registry.auth import create_token

    new = create_token(registry.tokens_file, "added-later")
    headers = {"Authorization": f"Bearer {new}"}
    deadline = time.monotonic() + 10
    while httpx.get(f"{registry.url}/v1/info", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "new token never accepted"
        time.sleep(0.3)
    text = registry.tokens_file.read_text()
    registry.tokens_file.write_text("".join(line + "\n" for line in text.splitlines()
                                            if not line.startswith("added-later ")))
    while httpx.get(f"{registry.url}/v1/info", headers=headers).status_code != 401:
        assert time.monotonic() < deadline, "revoked token still accepted"
        time.sleep(0.3)
    assert httpx.get(f"{registry.url}/v1/info", headers=registry.auth).status_code == 200



# --- issue 9: revocation fails closed, head limits, vanished archives, strict route ids ---


def _wait_status(url: str, headers: dict, want: int, what: str, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while (status := httpx.get(url, headers=headers).status_code) != want:
        assert time.monotonic() < deadline, f"{what}: still {status}, wanted {want}"
        time.sleep(0.2)


def test_tokens_file_gone_or_malformed_refuses_every_token(registry):
    import time

    url, good = f"{registry.url}/v1/info", registry.tokens_file.read_text()
    try:
        registry.tokens_file.unlink()
        _wait_status(url, registry.auth, 503, "deleted tokens file")
        r = httpx.get(url, headers=registry.auth)
        assert "tokens file is missing or malformed" in r.json()["detail"]
        assert str(registry.tokens_file) not in r.text  # the path stays in the server log
        assert "tokens file not found" in registry.log()
        assert httpx.get(url).status_code == 401  # no token: nothing to check
        registry.tokens_file.write_text(good + "this line is not a token\n")
        time.sleep(1.5)  # past the reload interval: the malformed file has been read
        assert httpx.get(url, headers=registry.auth).status_code == 503
        assert "expected 'NAME sha256:HEX'" in registry.log()
    finally:
        registry.tokens_file.write_text(good)
    _wait_status(url, registry.auth, 200, "restored tokens file")
    assert "is valid again" in registry.log()


def test_token_file_fails_closed_unit(tmp_path):
    from sdr_edge_server.registry.auth import TokenFile, TokensUnavailable, create_token

    path = tmp_path / "tokens.txt"
    token = create_token(path, "a")
    tokens = TokenFile(path, interval=0)
    assert tokens.check(token) == "a"
    good = path.read_text()
    path.unlink()
    with pytest.raises(TokensUnavailable, match="tokens file not found"):
        tokens.check(token)
    path.write_text("garbage\n")
    with pytest.raises(TokensUnavailable, match="expected 'NAME sha256:HEX'"):
        tokens.check(token)
    path.write_text(good)
    assert tokens.check(token) == "a" and tokens.check("sdr_other") is None


def _raw_head(registry, lines: list[bytes]) -> bytes:
    """Send one raw request head; the server may close before reading it all."""
    import contextlib
    import socket

    parts = urlsplit(registry.url)
    head = b"\r\n".join([b"GET /v1/info HTTP/1.1", b"Host: x", *lines]) + b"\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        with contextlib.suppress(OSError):  # reset after the 431: its answer is already here
            s.sendall(head)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            length = [line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if sep and length and len(body) >= int(length[0]):
                break
        return answer


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.parametrize("with_token", [False, True])
def test_431_for_huge_header_before_auth(registry, with_token):
    auth = [f"Authorization: Bearer {registry.token}".encode()] if with_token else []
    before = _rss_kib(registry.pid)
    answer = _raw_head(registry, [*auth, b"X-Big: " + b"a" * (16 << 20)])
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"exceed the limit of 16384 bytes" in answer
    assert _rss_kib(registry.pid) - before < 8 << 10  # not buffered (was +25 MB for 16 MB)
    good = _raw_head(registry, [*auth, b"X-Ok: " + b"a" * 8000])
    assert good.startswith(b"HTTP/1.1 " + (b"200" if with_token else b"401")), good[:200]


def test_431_for_too_many_headers(registry):
    auth = f"Authorization: Bearer {registry.token}".encode()
    answer = _raw_head(registry, [auth, *(b"X-%d: 1" % i for i in range(70))])
    assert answer.startswith(b"HTTP/1.1 431 ") and b"limit of 64" in answer, answer[:300]
    ok = _raw_head(registry, [auth, *(b"X-%d: 1" % i for i in range(50))])
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]


@pytest.mark.parametrize("kind", ["h11", "httptools"])
def test_header_limited_protocols_answer_431(kind):
    """Both protocol classes (httptools when installed, h11 otherwise) before a bare app."""
    import functools
    import time

    import uvicorn
    from helpers_registry import free_port

    from sdr_edge_server.registry import limits

    cls = limits.HeaderLimitH11Protocol if kind == "h11" else \
        getattr(limits, "HeaderLimitHttpToolsProtocol", None)
    if cls is None:
        pytest.skip("httptools is not installed")
    seen: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", ws="none",
        http=functools.partial(cls, max_header_bytes=4096, max_headers=8)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        reg = type("R", (), {"url": f"http://127.0.0.1:{port}"})()
        big = _raw_head(reg, [b"X-Big: " + b"a" * (2 << 20)])
        assert big.startswith(b"HTTP/1.1 431 ") and b"limit of 4096 bytes" in big, big[:200]
        many = _raw_head(reg, [b"X-%d: 1" % i for i in range(9)])
        assert many.startswith(b"HTTP/1.1 431 ") and b"limit of 8" in many, many[:200]
        assert seen == []  # the app never saw either request
        assert _raw_head(reg, [b"X-%d: 1" % i for i in range(6)]).startswith(b"HTTP/1.1 200 ")
        assert seen == ["/v1/info"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_body_limit_middleware_checks_headers_too():
    """For servers started without the protocol (uvicorn --factory): 431 from the app."""
    import asyncio

    from sdr_edge_server.registry.limits import BodyLimitMiddleware

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    mw = BodyLimitMiddleware(app, max_body_bytes=100, max_header_bytes=1024, max_headers=4)
    for headers, detail in [([(b"x-a", b"1")] * 5, "5 request header fields exceed the limit "
                                                     "of 4"),
                            ([(b"x-big", b"a" * 2000)], "exceed the limit of 1024 bytes")]:
        sent.clear()
        scope = {"type": "http", "headers": headers, "raw_path": b"/v1/info",
                 "query_string": b""}
        asyncio.run(mw(scope, receive, send))
        assert sent[0]["status"] == 431 and detail in sent[1]["body"].decode()


def test_vanished_archive_is_rebuilt_not_500(registry, tmp_path):
    import shutil

    from sdr_edge.registry_client import fetch_bundle

    route_id = "1-3-0-2"
    url = f"{registry.url}/v1/subnets/{route_id}"
    first = httpx.get(url, headers=registry.auth, timeout=60)
    assert first.status_code == 200
    (registry.cache_dir / f"{route_id}.tar").unlink()  # the archive only: re-packed
    again = httpx.get(url, headers=registry.auth, timeout=60)
    assert again.status_code == 200 and again.content == first.content
    assert f"cached archive {route_id}.tar disappeared" in registry.log()
    (registry.cache_dir / f"{route_id}.tar").unlink()  # archive and bundle: re-extracted
    shutil.rmtree(registry.cache_dir / route_id)
    out = fetch_bundle(registry.url, registry.token, route_id, registry.pubkey, tmp_path / "b")
    assert json.loads((out / "manifest.json").read_text())["route"] == [1, 3, 0, 2]
    assert registry.log().count(f"extracted and signed sub-net {route_id}") == 2


@pytest.mark.parametrize("text", ["1-2-3-0\n", "1-2-3-0\r\n", " 1-2-3-0", "+1-2-3-0",
                                  "1_0-2-3-0", "\uff11-2-3-0", "1-2-3-0 ", "1-2-3-0/../kit"])
def test_route_ids_are_fullmatched(text):
    from sdr_edge.registry_client import _bundle_id
    from sdr_edge_server.registry.route_ids import RouteIdError, parse_route_id

    with pytest.raises(RouteIdError, match="malformed route id"):
        parse_route_id(text, TINY_BRANCHING)
    with pytest.raises(RouteIdError, match="malformed route id"):
        _bundle_id(text, None)  # refused before any request (it would go into the URL)
    assert parse_route_id("1-2-3-0", TINY_BRANCHING) == (1, 2, 3, 0)
    assert _bundle_id("1-2-3-0", None) == ("1-2-3-0", (1, 2, 3, 0))


@pytest.mark.parametrize("text", ["+1,0,2,3", "1_0,0,2,3", "\uff11,0,2,3", "1,,2,3", "1,0,2,"])
def test_config_route_is_plain_digits(text):
    from types import SimpleNamespace

    from sdr_edge.federated.config import FederationConfig, FederationConfigError

    with pytest.raises(FederationConfigError, match="is not digits like"):
        FederationConfig.fixed_route(SimpleNamespace(route=text))
    for good in ("1,0,2,3", "1-0-2-3", " 1,0,2,3\n"):
        assert FederationConfig.fixed_route(SimpleNamespace(route=good)) == (1, 0, 2, 3)


def test_route_id_with_trailing_newline_is_404(registry):
    status, body = raw_get(registry, "/v1/subnets/1-2-3-0%0A", registry.token)
    assert status == 404 and "malformed route id" in body["detail"]


@pytest.mark.parametrize("flag,value,message", [
    ("--max-headers", "0", "--max-headers must be positive, got 0"),
    ("--max-header-bytes", "512", "--max-header-bytes 512 is too small"),
])
def test_serve_refuses_bad_header_limits(tmp_path, capsys, flag, value, message):
    from sdr_edge_server.cli import main as server_main

    (tmp_path / "run").mkdir()
    for name in ("tokens.txt", "server.key"):
        (tmp_path / name).write_text("")
    args = ["serve", "--run", str(tmp_path / "run"), "--tokens", str(tmp_path / "tokens.txt"),
            "--key", str(tmp_path / "server.key"), flag, value]
    assert server_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_foreign_file_in_a_cache_folder_is_kept_and_answered_503(registry):
    """The cache never deletes what it did not write: a note dropped into a cached bundle folder
    stays, and the request gets a 503 naming the cause instead of a 500."""
    route_id = "2-1-0-3"
    url = f"{registry.url}/v1/subnets/{route_id}"
    assert httpx.get(url, headers=registry.auth, timeout=60).status_code == 200
    (registry.cache_dir / f"{route_id}.tar").unlink()
    note = registry.cache_dir / route_id / "notes.txt"
    note.write_text("mine")
    answer = httpx.get(url, headers=registry.auth, timeout=60)
    assert answer.status_code == 503 and "did not write" in answer.json()["detail"]
    assert note.read_text() == "mine"
    assert f"cannot cache sub-net {route_id}" in registry.log()
    note.unlink()  # once the foreign file is gone the sub-net is served again
    assert httpx.get(url, headers=registry.auth, timeout=60).status_code == 200
