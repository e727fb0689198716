"""Property-based pass over the registry's OpenAPI schema (schemathesis): no input gives a 5xx.

schemathesis' lazy pytest fixture loader does not work with pytest 9 (it sets a private node
attribute), so each operation's Hypothesis strategy is driven with `@given` directly:
30 schema-conforming and 30 schema-violating examples per operation, each sent with and
without the bearer token.
"""

from __future__ import annotations

import collections

import pytest
import schemathesis
from helpers_registry import serve_registry
from helpers_rundir import shared_tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow  # a real server process


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    with serve_registry(run_dir, tmp_path_factory.mktemp("schema-registry")) as reg:
        yield reg


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(registry, mode):
    schema = schemathesis.openapi.from_url(f"{registry.url}/openapi.json")
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()

    def check(case):
        for headers in (registry.auth, {}):
            response = case.call(base_url=registry.url, headers=headers, timeout=60)
            statuses[(f"{case.method} {case.path}", response.status_code)] += 1
            assert response.status_code < 500, (case.method, case.formatted_path,
                                                response.status_code, response.text)
            if not headers and case.path != "/healthz":
                assert response.status_code in (401, 404, 405, 413), response.text

    budget = settings(max_examples=30, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            budget(given(case=operation.as_strategy(mode))(lambda case: check(case)))()
        except Unsatisfiable:  # nothing to violate (e.g. GET /healthz takes no input)
            assert mode == GenerationMode.NEGATIVE and operation.path == "/healthz"
    ops = {op for op, _ in statuses}
    assert {"POST /v1/route", "GET /v1/subnets/{route_id}", "GET /v1/kit"} <= ops
    if mode == GenerationMode.POSITIVE:  # conforming requests with a token were answered
        assert statuses[("GET /v1/kit", 200)] > 0 and statuses[("GET /v1/info", 200)] > 0
