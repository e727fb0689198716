"""The few best-scoring routes of a signature, for every /v1/route answer.

Same score (`sdr_edge.routing.signature.route_score_grid`: sum of floored log mean
probabilities) and order as `score_routes` (best first, ties in lexicographic route order; a
test checks they agree), but the route table is built once and only the top k are turned
into Python objects: that is most of the CPU a /v1/route request costs, and the registry
answers thousands per second.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdr_edge.routing.signature import Signature, all_routes, route_score_grid


class TopRoutes:
    """Top-k (route, score) pairs for signatures over one branching."""

    def __init__(self, branching: Sequence[int]) -> None:
        self.branching = tuple(int(b) for b in branching)
        self.routes = np.asarray(all_routes(self.branching), dtype=np.int64)

    def __call__(self, sig: Signature, k: int) -> list[tuple[tuple[int, ...], float]]:
        if tuple(sig.branching) != self.branching:
            raise ValueError(f"signature branching {sig.branching} != {self.branching}")
        flat = route_score_grid(sig)
        order = np.argsort(-flat, kind="stable")[:k]
        return [(tuple(int(d) for d in self.routes[i]), float(flat[i])) for i in order]
