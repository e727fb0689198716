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

    from server.registry.auth import create_token

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

