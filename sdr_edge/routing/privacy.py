"""Differentially private signatures: the Laplace mechanism on per-level sums and the count.

What is released. For a device with images x_1..x_n and a fixed, public signature kit giving
each image one probability vector p_i,r (non-negative, summing to 1) per level r = 1..R, the
exact signature is m_r = S_r / n with S_r = sum_i p_i,r. With `dp_epsilon = eps` the device
releases instead

    S~_r = S_r + Lap(b)^{B_r}   for every level,   n~ = n + Lap(b),   b = (R + 1) / eps,

and then only post-processes: clip S~_r at 0, renormalise each level to sum to 1 (this is
the released m~_r; a level clipped to all zeros becomes uniform) and round n~ to an integer
>= 1. Post-processing never weakens differential privacy.

Sensitivity. Adding or removing one image changes each S_r by one probability vector (L1
norm exactly 1; the kit's outputs are renormalised in float64 before summing so that holds)
and n by 1: the L1 sensitivity of (S_1, ..., S_R, n) is R + 1. Hence the release is
eps-differentially private with respect to adding or removing one image (unbounded DP).
Replacing one image changes each S_r by at most 2 in L1 and n not at all: sensitivity 2R, so
the same release is (2R / (R + 1)) * eps-DP (< 2 eps) under replacement. The count is therefore
NOT public: it is noised and released noisy. Equivalently the means receive Laplace noise of
scale b / n per coordinate, so the cost in routing accuracy falls as the device holds more
images (`benchmarks/signature_dp.py` measures it).

The signature's `run_id` names the public kit, not the images: it is released as is and costs
no privacy.

Caveats. The guarantee is per signature released; k signatures from the same images compose
to k * eps. Noise comes from NumPy's floating-point Laplace sampler (no snapping mechanism,
Mironov 2012), seeded from OS entropy unless a generator is passed (pass one only in tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.signature import Signature, signature_from_sums


class PrivacyBudgetError(SdrEdgeError, ValueError):
    """A privacy budget (--dp-epsilon, dp_epsilon) that is not a positive number."""


def laplace_scale(levels: int, epsilon: float) -> float:
    """b = (R + 1) / eps: the L1 sensitivity of (sums, count) over the privacy budget."""
    if not np.isfinite(epsilon) or epsilon <= 0:
        raise PrivacyBudgetError(f"dp epsilon must be a positive number, got {epsilon}")
    if levels < 1:
        raise ValueError("a signature has at least one level")
    return (levels + 1) / float(epsilon)


def noisy_sums_and_count(sums: Sequence[np.ndarray], count: int, epsilon: float,
                         rng: np.random.Generator | None = None
                         ) -> tuple[list[np.ndarray], float]:
    """The raw Laplace mechanism (before post-processing): noisy per-level sums and count."""
    rng = rng if rng is not None else np.random.default_rng()
    b = laplace_scale(len(sums), epsilon)
    noisy = [np.asarray(s, dtype=np.float64) + rng.laplace(0.0, b, size=np.shape(s)) for s in sums]
    return noisy, float(count) + float(rng.laplace(0.0, b))


def private_signature(sums: Sequence[np.ndarray], count: int, epsilon: float,
                      rng: np.random.Generator | None = None,
                      run_id: str | None = None) -> Signature:
    """An eps-DP signature (see the module docstring) from exact per-level probability sums."""
    noisy, n = noisy_sums_and_count(sums, count, epsilon, rng)
    return signature_from_sums(noisy, max(1, int(round(n))), dp_epsilon=float(epsilon),
                               run_id=run_id)


def exact_or_private(sums: Sequence[np.ndarray], count: int, epsilon: float | None,
                     rng: np.random.Generator | None = None,
                     run_id: str | None = None) -> Signature:
    """The exact signature when epsilon is None, else the private one (both name the run)."""
    if epsilon is None:
        return signature_from_sums(sums, count, run_id=run_id)
    return private_signature(sums, count, epsilon, rng, run_id)
