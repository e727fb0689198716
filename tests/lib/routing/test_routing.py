"""Signatures (format, validation, aggregation), routing scores and DP noise, on synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdr_edge.routing.privacy import laplace_scale, noisy_sums_and_count, private_signature
from sdr_edge.routing.signature import (
    Signature,
    SignatureValidationError,
    aggregate_signatures,
    route_score,
    route_signature,
    score_routes,
    signature_from_sums,
    validate_signature,
)

B44 = (4, 4, 4, 4)


def _sig(levels, count=10, branching=None) -> Signature:
    branching = branching or tuple(len(lv) for lv in levels)
    return Signature(tuple(branching), [list(map(float, lv)) for lv in levels], count)


def _obj(**overrides) -> dict:
    base = _sig([[0.1, 0.2, 0.3, 0.4]] * 4).to_dict()
    base.update(overrides)
    return base


def test_json_round_trip_is_small():
    rng = np.random.default_rng(0)
    sig = signature_from_sums([rng.random(4) for _ in range(4)], 1234)
    text = sig.to_json()
    assert len(text.encode()) < 400
    back = Signature.from_json(text, B44)
    assert back.branching == B44 and back.count == 1234 and back.dp_epsilon is None
    np.testing.assert_allclose(np.array(back.levels), np.array(sig.levels), atol=1e-6)
    assert json.loads(text)["format"] == "sdr-signature"


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"levels": [[0.25] * 4] * 3}, "levels", "must have 4 levels"),
    ({"levels": [[0.25] * 4, [0.5, 0.5], [0.25] * 4, [0.25] * 4]}, "levels[1]", "4 probabilities"),
    ({"levels": [[0.25] * 4] * 2 + [[math.nan, 0.5, 0.25, 0.25]] + [[0.25] * 4]},
     "levels[2][0]", "finite"),
    ({"levels": [[0.25] * 4] * 3 + [[0.25, 0.25, 0.25, math.inf]]}, "levels[3][3]", "finite"),
    ({"levels": [[-0.1, 0.6, 0.25, 0.25]] + [[0.25] * 4] * 3}, "levels[0][0]", "negative"),
    ({"levels": [[0.25] * 4] * 2 + [[0.5] * 4] + [[0.25] * 4]}, "levels[2]", "sum to 2"),
    ({"levels": [[0.25] * 4] * 3 + [[0.25, "a", 0.25, 0.25]]}, "levels[3][1]", "finite"),
    ({"count": 0}, "count", "positive integer"),
    ({"count": True}, "count", "positive integer"),
    ({"count": 3.5}, "count", "positive integer"),
    ({"branching": [4, 4, 4]}, "branching", "routes over"),
    ({"branching": [4, 4, 4, 1]}, "branching[3]", "integer in"),
    ({"dp_epsilon": -1.0}, "dp_epsilon", "positive"),
    ({"format": "other"}, "format", "sdr-signature"),
    ({"version": 2}, "version", "unsupported"),
    ({"extra": 1}, "extra", "unknown field"),
])
def test_malformed_signatures_name_the_field(change, field, message):
    with pytest.raises(SignatureValidationError, match=message) as err:
        validate_signature(_obj(**change), B44)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_not_an_object_and_bad_json_are_refused():
    with pytest.raises(SignatureValidationError) as err:
        validate_signature([1, 2], B44)
    assert err.value.field == "signature"
    with pytest.raises(SignatureValidationError, match="not valid JSON"):
        Signature.from_json("{not json", B44)


def test_sum_tolerance_accepts_rounding():
    ok = validate_signature(_obj(levels=[[0.1, 0.2, 0.3, 0.4004]] + [[0.25] * 4] * 3), B44)
    assert ok.levels[0][3] == pytest.approx(0.4004)


def test_route_is_majority_and_top_score():
    sig = _sig([[0.1, 0.6, 0.3], [0.5, 0.5], [0.2, 0.2, 0.2, 0.4]])
    assert route_signature(sig) == (1, 0, 3)  # ties go to the lowest digit
    scored = score_routes(sig)
    assert len(scored) == 3 * 2 * 4
    assert scored[0][0] == (1, 0, 3)
    scores = [s for _, s in scored]
    assert scores == sorted(scores, reverse=True)
    assert dict(scored)[(2, 1, 0)] == pytest.approx(math.log(0.3) + math.log(0.5) + math.log(0.2))
    assert route_score(sig, (0, 0, 0)) == pytest.approx(math.log(0.1 * 0.5 * 0.2))
    # exp(score) sums to 1 over all cells: a distribution under level independence
    assert sum(math.exp(s) for s in scores) == pytest.approx(1.0)


def test_zero_probabilities_score_finitely():
    sig = _sig([[1.0, 0.0], [0.0, 1.0]])
    scored = score_routes(sig)
    assert scored[0] == ((0, 1), 0.0)
    assert all(math.isfinite(s) for _, s in scored)


def test_aggregate_weights_by_count():
    a = _sig([[1.0, 0.0], [0.5, 0.5]], count=1)
    b = _sig([[0.0, 1.0], [0.5, 0.5]], count=3)
    agg = aggregate_signatures([a, b])
    assert agg.count == 4
    np.testing.assert_allclose(agg.levels[0], [0.25, 0.75])
    assert route_signature(agg) == (1, 0)
    assert agg.dp_epsilon is None
    private = [Signature(a.branching, a.levels, 5, 1.0), Signature(a.branching, a.levels, 5, 2.0)]
    assert aggregate_signatures(private).dp_epsilon == 2.0
    with pytest.raises(ValueError, match="branching"):
        aggregate_signatures([a, _sig([[0.5, 0.5, 0.0]])])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_signatures([])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 5), min_size=1, max_size=4).flatmap(
    lambda br: st.tuples(st.just(br), st.lists(
        st.lists(st.floats(0.0, 10.0), min_size=max(br), max_size=max(br)),
        min_size=len(br), max_size=len(br)), st.integers(1, 10**6))))
def test_any_valid_signature_round_trips_and_routes_to_its_top_score(case):
    branching, raw, count = case
    sig = signature_from_sums([np.asarray(r[:b]) for r, b in zip(raw, branching, strict=True)],
                              count)
    back = Signature.from_json(sig.to_json(), branching)
    assert back.count == count
    assert score_routes(back)[0][1] == pytest.approx(route_score(back, route_signature(back)))
    # The bench's "routed" control relies on it: the majority route is the top-scored one.
    assert score_routes(back)[0][0] == route_signature(back)


def test_laplace_noise_statistics():
    """Empirical variance of the noise is 2 b^2 with b = (R + 1) / eps; its mean is 0."""
    rng = np.random.default_rng(1234)
    eps, reps = 0.5, 4000
    sums = [np.full(4, 25.0)] * 4
    b = laplace_scale(4, eps)
    assert b == pytest.approx(10.0)
    noise = []
    for _ in range(reps):
        noisy, n = noisy_sums_and_count(sums, 100, eps, rng)
        noise.append(np.concatenate([np.concatenate(noisy) - 25.0, [n - 100.0]]))
    noise = np.asarray(noise).ravel()
    assert noise.mean() == pytest.approx(0.0, abs=4 * math.sqrt(2) * b / math.sqrt(noise.size))
    assert noise.var() == pytest.approx(2 * b * b, rel=0.05)
    # Laplace, not Gaussian: E|X| = b
    assert np.abs(noise).mean() == pytest.approx(b, rel=0.03)


def test_private_signature_is_valid_and_costs_less_with_more_images():
    rng = np.random.default_rng(7)
    means = [np.array([0.4, 0.3, 0.2, 0.1])] * 4
    exact_route = (0, 0, 0, 0)
    unchanged = {}
    for n in (20, 2000):
        kept = 0
        for _ in range(200):
            sig = private_signature([m * n for m in means], n, 1.0, rng)
            validate_signature(json.loads(sig.to_json()), B44)
            assert sig.dp_epsilon == 1.0 and sig.count >= 1
            kept += route_signature(sig) == exact_route
        unchanged[n] = kept / 200
    assert unchanged[2000] > 0.95
    assert unchanged[20] < unchanged[2000]
    with pytest.raises(ValueError, match="positive"):
        private_signature(means, 10, 0.0)
