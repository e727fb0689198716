"""Route scores from each image's whole code, not from per-level marginals.

The signature (`sdr_edge.routing.signature`) keeps, per level r, the task mean m_r of the kit's
digit probabilities and scores a route by sum_r log m_r[b_r]: exact only if a task image's
digits at different levels were independent. A task made of several groups breaks that: the
per-level majorities can name a cell that none of its images falls in. Under tree codes it is
worse, since child c of one parent and child c of another are unrelated cells.

Two rules that keep each image's levels together, over the same kit outputs:

* ``joint`` — the task's mean over images of prod_r p_ir[b_r]: the probability that a random
  task image falls in the route's cell, under the kit's per-image probabilities. Its log is
  the score, so it ranks routes like the marginal score does when the levels are independent.
* ``mode`` — how many task images have the route as their whole argmax code (the most frequent
  code wins, ties broken by ``joint``): a majority vote over whole codes instead of one per
  level.

Both need the per-image probabilities, which a signature does not carry; they are measured by
``benchmarks/route_rules.py`` against the marginal rule on the same probed sub-nets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdr_edge.routing.signature import (
    PROB_FLOOR,
    Route,
    rank_routes,
    route_score_grid,
    signature_from_sums,
)

RULES = ("marginal", "joint", "mode")


def _normalised(probs: Sequence[np.ndarray]) -> list[np.ndarray]:
    if not probs:
        raise ValueError("need at least one level of probabilities")
    n = probs[0].shape[0]
    out = []
    for r, p in enumerate(probs):
        p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
        if p.ndim != 2 or p.shape[0] != n or n == 0:
            raise ValueError(f"level {r}: expected an N x B array with N = {n} > 0, got {p.shape}")
        out.append(p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300))
    return out


def marginal_scores(probs: Sequence[np.ndarray]) -> np.ndarray:
    """sum_r log m_r[b_r] for every route, in `all_routes` order (the signature's score)."""
    levels = _normalised(probs)
    return route_score_grid(signature_from_sums([p.sum(axis=0) for p in levels], len(levels[0])))


def joint_scores(probs: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean over images of prod_r p_ir[b_r], for every route in `all_routes` order."""
    levels = _normalised(probs)
    cell = levels[0]
    for p in levels[1:]:  # N x (B_1 ... B_r) -> N x (B_1 ... B_{r+1}), row-major = all_routes
        cell = (cell[:, :, None] * p[:, None, :]).reshape(cell.shape[0], -1)
    return np.log(np.maximum(cell.mean(axis=0), PROB_FLOOR))


def mode_scores(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Images whose argmax code is the route, plus `joint`'s probability (< 1) to break ties."""
    levels = _normalised(probs)
    flat = np.zeros(levels[0].shape[0], dtype=np.int64)
    for p in levels:
        flat = flat * p.shape[1] + p.argmax(axis=1)
    counts = np.bincount(flat, minlength=int(np.prod([p.shape[1] for p in levels])))
    return counts + np.exp(joint_scores(levels)) * 0.5


def rule_scores(rule: str, probs: Sequence[np.ndarray]) -> np.ndarray:
    """Every route's score under `rule` (one of RULES), in `all_routes` order; higher is better."""
    if rule == "marginal":
        return marginal_scores(probs)
    if rule == "joint":
        return joint_scores(probs)
    if rule == "mode":
        return mode_scores(probs)
    raise ValueError(f"unknown routing rule {rule!r}: expected one of {', '.join(RULES)}")


def ranked_routes(rule: str, probs: Sequence[np.ndarray]) -> list[tuple[Route, float]]:
    """Routes best first under `rule` (ties: lexicographic route order, as `score_routes`)."""
    return rank_routes(rule_scores(rule, probs), [p.shape[1] for p in probs])
