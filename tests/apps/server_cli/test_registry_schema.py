"""Property-based pass over the registry's OpenAPI schema: no 5xx, and schema and server agree.

schemathesis' lazy pytest fixture loader does not work with pytest 9 (it sets a private node
attribute), so each operation's Hypothesis strategy is driven with `@given` directly, each
example sent with and without the bearer token.

Agreement is judged both ways with a Draft 2020-12 validator on the schema the server serves:
a request the schema accepts is not refused by the server's own validator (no 422 for a
signature, no 404 for a route id), and a request the schema refuses is never served (no 200).
Two things JSON schema cannot say are the only exceptions allowed: a level must sum to 1, and
an integer must be written without a fraction (`2.0` is an integer to JSON schema). Random
numbers almost never sum to 1, so custom strategies also build routable signatures
(normalised weights) and route ids (from the served pattern) and check both are answered.
"""

from __future__ import annotations

import collections
import json
import re
from urllib.parse import quote

import httpx
import jsonschema_rs
import pytest
import schemathesis
from helpers_registry import serve_registry
from helpers_rundir import TINY_BRANCHING, shared_tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NotSet

pytestmark = pytest.mark.slow  # a real server process
SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    with serve_registry(run_dir, tmp_path_factory.mktemp("schema-registry")) as reg:
        yield reg


class Served:
    """The served schema's validators for the two inputs a client makes up."""

    def __init__(self, registry) -> None:
        doc = httpx.get(f"{registry.url}/openapi.json").json()
        route = doc["paths"]["/v1/route"]["post"]["requestBody"]["content"]["application/json"]
        param = next(p for p in doc["paths"]["/v1/subnets/{route_id}"]["get"]["parameters"]
                     if p["name"] == "route_id")
        self.signature_schema = route["schema"]
        self.signature = jsonschema_rs.Draft202012Validator(route["schema"])
        self.route_id = jsonschema_rs.Draft202012Validator(param["schema"])
        self.pattern = param["schema"]["pattern"]
        self.info = httpx.get(f"{registry.url}/v1/info", headers=registry.auth).json()


@pytest.fixture(scope="module")
def served(registry) -> Served:
    return Served(registry)


def _fraction_only(body: object) -> bool:
    """count/version written as an integral float: JSON schema's integer, the server's 422."""
    return isinstance(body, dict) and any(
        isinstance(body.get(k), float) and body[k].is_integer() for k in ("count", "version"))


def _top_is_valid(query: object) -> bool:
    """`?top=M` of POST /v1/route: absent, or an integer 1..64 (what its Query says)."""
    if not isinstance(query, dict) or "top" not in query:
        return True
    value = query["top"]
    return bool(re.fullmatch(r"[0-9]+", str(value))) and 1 <= int(str(value)) <= 64


def check_agreement(served: Served, op: str, body: object, route_id: object,
                    response: httpx.Response | object, query: object = None) -> None:
    """Schema verdict vs server verdict for one request that passed authentication (a 401 or
    413 was decided before any validator: a mutated Authorization header, a huge body)."""
    status = response.status_code
    if status in (401, 413):
        return
    if op == "POST /v1/route" and not _top_is_valid(query):
        assert status == 422, (query, status, response.text)
    elif op == "POST /v1/route" and not isinstance(body, NotSet | bytes):
        if served.signature.is_valid(body):
            if status == 422:
                detail = response.json()["detail"]
                assert "not 1 (tolerance" in detail or _fraction_only(body), (body, detail)
            else:
                assert status in (200, 409), (body, status, response.text)  # 409: other run
        else:
            assert status != 200, ("schema refuses but server routed", body)
    elif op == "GET /v1/subnets/{route_id}" and isinstance(route_id, str):
        if served.route_id.is_valid(route_id):
            assert status == 200, (route_id, status, response.text)
        else:
            assert status != 200, ("schema refuses but server served", route_id)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_schema_agrees(registry, served, mode):
    schema = schemathesis.openapi.from_url(f"{registry.url}/openapi.json")
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()

    def check(case):
        op = f"{case.method} {case.path}"
        for headers in (registry.auth, {}):
            response = case.call(base_url=registry.url, headers=headers, timeout=60)
            statuses[(op, response.status_code)] += 1
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                response.status_code, response.text)
            if not headers and case.path != "/healthz":
                assert response.status_code in (401, 404, 405, 413), response.text
            elif headers and case.media_type in (None, "application/json"):
                check_agreement(served, op, case.body,
                                (case.path_parameters or {}).get("route_id"), response,
                                case.query)

    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            SETTINGS(given(case=operation.as_strategy(mode))(lambda case: check(case)))()
        except Unsatisfiable:  # nothing to violate (e.g. GET /healthz takes no input)
            assert mode == GenerationMode.NEGATIVE and operation.path == "/healthz"
    ops = {op for op, _ in statuses}
    assert {"POST /v1/route", "GET /v1/subnets/{route_id}", "GET /v1/kit"} <= ops
    if mode == GenerationMode.POSITIVE:  # conforming requests with a token were answered
        assert statuses[("GET /v1/kit", 200)] > 0 and statuses[("GET /v1/info", 200)] > 0
        assert statuses[("GET /v1/subnets/{route_id}", 200)] > 0
    else:
        assert statuses[("POST /v1/route", 422)] > 0


def signatures(run_id: str | None) -> st.SearchStrategy[dict]:
    """Routable signatures: per level, non-negative weights normalised to sum to 1."""
    def level(size: int) -> st.SearchStrategy[list[float]]:
        weights = st.lists(st.integers(0, 1000), min_size=size, max_size=size)
        return weights.filter(any).map(lambda w: [x / sum(w) for x in w])

    optional = st.fixed_dictionaries({}, optional={
        "format": st.just("sdr-signature"), "version": st.just(1),
        "branching": st.just(list(TINY_BRANCHING)),
        "dp_epsilon": st.none() | st.floats(0.01, 100)})
    return st.tuples(st.tuples(*(level(b) for b in TINY_BRANCHING)),
                     st.integers(1, 10**9), optional).map(
        lambda t: {"levels": [list(x) for x in t[0]], "count": t[1], "run_id": run_id,
                   **t[2]})


def test_routable_signatures_are_schema_valid_and_routed(registry, served):
    """What the generator cannot reach: every signature the validator accepts is schema-valid,
    is routed, and its bundle is served."""
    seen: set[str] = set()
    with httpx.Client(base_url=registry.url, headers=registry.auth, timeout=60) as client:
        @SETTINGS
        @given(sig=signatures(served.info.get("run_id")))
        def check(sig):
            assert served.signature.is_valid(sig), sig
            r = client.post("/v1/route", content=json.dumps(sig),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 200, (sig, r.text)
            bundle_id = r.json()["bundle_id"]
            assert served.route_id.is_valid(bundle_id)
            if bundle_id not in seen and len(seen) < 8:  # a few extractions, not 30
                seen.add(bundle_id)
                assert client.get(f"/v1/subnets/{bundle_id}").status_code == 200

        check()
    assert seen


def test_route_ids_schema_and_server_agree(registry, served):
    """Route ids from the served pattern are served; near misses (a trailing newline, a digit
    out of range, a level too many) are refused by both the schema and the server."""
    ids = st.from_regex(served.pattern.removeprefix("^").removesuffix("$"), fullmatch=True)
    near = st.builds(lambda r, tail: r + tail, ids,
                     st.sampled_from(["\n", "\r\n", " ", "-0", "0", "-", "/", "%", "\x00"]))
    with httpx.Client(base_url=registry.url, headers=registry.auth, timeout=60) as client:
        @SETTINGS
        @given(route_id=ids | near | st.text(max_size=12))
        def check(route_id):
            r = client.get(f"/v1/subnets/{quote(route_id, safe='')}")
            assert r.status_code < 500, (route_id, r.text)
            check_agreement(served, "GET /v1/subnets/{route_id}", None, route_id, r)

        check()
    assert not served.route_id.is_valid("1-2-3-0\n") and served.route_id.is_valid("1-2-3-0")
    assert not served.route_id.is_valid("4-0-0-0") and not served.route_id.is_valid("0-0-0")


def test_schema_states_the_level_rules(served):
    """The item 9 case: `levels: [[],[],[],[]]` and too few/many probabilities are refused by
    the schema, as by the server."""
    base = {"levels": [[0.25] * 4] * 4, "count": 3, "run_id": served.info.get("run_id")}
    assert served.signature.is_valid(base)
    for levels in ([[], [], [], []], [[0.5, 0.5]] * 4, [[0.2] * 5] * 4, [[0.25] * 4] * 3,
                   [[0.25, 0.25, 0.25, -0.25]] + [[0.25] * 4] * 3, [[2, 0, 0, 0]] * 4):
        assert not served.signature.is_valid({**base, "levels": levels}), levels
    assert not served.signature.is_valid({**base, "branching": [4, 4, 4, 8]})
    assert not served.signature.is_valid({**base, "count": 0})
