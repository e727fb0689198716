"""Whole-code routing rules (sdr_edge.routing.joint) against the signature's marginal score."""

import numpy as np
import pytest

from sdr_edge.routing.joint import joint_scores, marginal_scores, ranked_routes, rule_scores
from sdr_edge.routing.signature import all_routes, score_routes, signature_from_sums


def one_hot_codes(codes: list[tuple[int, int]], branching=(2, 2)) -> list[np.ndarray]:
    return [np.eye(b)[[c[r] for c in codes]] for r, b in enumerate(branching)]


def test_marginal_rule_is_the_signature_score():
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(b), size=50) for b in (3, 4, 2)]
    sig = signature_from_sums([p.sum(axis=0) for p in probs], 50)
    expected = dict(score_routes(sig))
    got = marginal_scores(probs)
    assert np.allclose(got, [expected[r] for r in all_routes((3, 4, 2))], atol=1e-9)


def test_whole_code_rules_pick_the_populated_cell_the_marginals_miss():
    # 40 % of the images in cell (0, 1), 30 % in (1, 0), 30 % in (1, 1): the per-level
    # majorities (1 at level 0, 1 at level 1) name (1, 1), which holds fewer images than (0, 1).
    codes = [(0, 1)] * 4 + [(1, 0)] * 3 + [(1, 1)] * 3
    probs = one_hot_codes(codes)
    assert ranked_routes("marginal", probs)[0][0] == (1, 1)
    assert ranked_routes("joint", probs)[0][0] == (0, 1)
    assert ranked_routes("mode", probs)[0][0] == (0, 1)
    # with one-hot probabilities the joint is the code histogram itself
    assert np.allclose(np.exp(joint_scores(probs)), [0.0, 0.4, 0.3, 0.3], atol=1e-9)


def test_mode_counts_images_and_breaks_ties_by_joint():
    probs = [np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), np.array([[1.0, 0.0]] * 3)]
    scores = rule_scores("mode", probs)  # codes (0,0), (0,0), (1,0)
    assert scores.argmax() == 0 and 2.0 <= scores[0] < 3.0 and 1.0 <= scores[2] < 2.0


def test_unknown_rule_and_bad_shapes_are_refused():
    probs = one_hot_codes([(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="marginal, joint, mode"):
        rule_scores("argmax", probs)
    with pytest.raises(ValueError, match="level 1"):
        joint_scores([probs[0], probs[1][:1]])
