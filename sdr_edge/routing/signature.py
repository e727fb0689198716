"""Task signatures: per-level mean code-digit probabilities of a device's images, and routing.

A signature is what a client sends to the registry (a few hundred bytes for 4 x 4): for each
routing level r, the mean over the task's images of the signature kit's probabilities over the
B_r digits, plus the image count. It imports NumPy only, because the client computes it without
torch and the registry / Flower server validate and aggregate it.

Routing score. For a route (b_1, ..., b_R) the score is

    score(route) = sum_r log m_r[b_r]

where m_r is the signature's mean probability vector at level r. If the levels of a random task
image's code were independent, exp(score) would be the probability that a random task image
falls in that route's cell, so the score ranks sub-nets by how much of the task they were
trained on. The routed sub-net (each level's digit by majority, i.e. argmax of m_r) is always
the top-scoring one. Probabilities are floored at `PROB_FLOOR` so a zero never gives -inf.

Run identity. Code digits mean something only within the run whose residual k-means made
them: a kit from another run with the same branching yields a well-formed signature that
routes to the wrong sub-net. So a kit records `run_id` (`run_id_of`: the first 16 hex digits
of the sha256 of the run's codebooks.safetensors, which fix what every digit means; the kit
and the SDRnet's experts were both trained on the codes they give), every signature carries
it, and whoever routes against a run checks it (`check_run_id`): another run's id is refused
(`RunIdMismatchError`, HTTP 409 at the registry), and so is a signature without one when the
served kit records an id (an older client or kit: recompute with the current kit). Only a
legacy run whose own kit predates run ids accepts signatures without one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdr_edge.errors import SdrEdgeError

SIGNATURE_FORMAT = "sdr-signature"
SIGNATURE_VERSION = 1
SUM_TOLERANCE = 1e-3  # each level's probabilities must sum to 1 within this
PROB_FLOOR = 1e-12  # log of a zero probability is taken as log(PROB_FLOOR)
MAX_LEVELS = 16  # bounds on a signature validated without a known branching
MAX_BRANCHING = 1024
MAX_SUBNETS = 1 << 20  # score_routes enumerates every route
DECIMALS = 6  # JSON precision: keeps 4 x 4 signatures at a few hundred bytes
RUN_ID_SOURCE = "codebooks.safetensors"  # = sdr_edge.artifacts.run_dir.CODEBOOKS (imports torch)
RUN_ID_HEX = 16  # 64 bits: tells runs apart (a consistency check, not a secret); keeps it small
_RUN_ID = re.compile(rf"[0-9a-f]{{{RUN_ID_HEX}}}")
REFETCH_HINT = "fetch this server's kit (sdr-client fetch --kit) and recompute the signature"

log = logging.getLogger(__name__)

Route = tuple[int, ...]


class SignatureValidationError(SdrEdgeError, ValueError):
    """A signature is malformed; `field` names the offending part (e.g. 'levels[2]')."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RunIdMismatchError(SignatureValidationError):
    """A well-formed signature computed with another run's kit (the registry answers 409)."""


@dataclass(frozen=True)
class Signature:
    """Per-level mean digit probabilities of a task's images, with the image count."""

    branching: tuple[int, ...]
    levels: list[list[float]]
    count: int
    dp_epsilon: float | None = None
    run_id: str | None = None  # the run of the kit it was computed with (see the module doc)

    def to_dict(self) -> dict:
        return {
            "format": SIGNATURE_FORMAT,
            "version": SIGNATURE_VERSION,
            "run_id": self.run_id,
            "branching": [int(b) for b in self.branching],
            "levels": [[round(float(p), DECIMALS) for p in level] for level in self.levels],
            "count": int(self.count),
            "dp_epsilon": None if self.dp_epsilon is None else float(self.dp_epsilon),
        }

    def to_json(self) -> str:
        """Compact JSON (what `sdr-client signature` writes and the registry receives)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, branching: Sequence[int] | None = None) -> Signature:
        """Parse and validate; raises SignatureValidationError naming the bad field."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SignatureValidationError("signature", f"not valid JSON ({exc})") from exc
        return validate_signature(obj, branching)

    def as_arrays(self) -> list[np.ndarray]:
        return [np.asarray(level, dtype=np.float64) for level in self.levels]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_branching(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise SignatureValidationError(field, "must be a non-empty list of integers")
    if len(value) > MAX_LEVELS:
        raise SignatureValidationError(field, f"at most {MAX_LEVELS} levels")
    out = []
    for i, b in enumerate(value):
        if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= MAX_BRANCHING:
            raise SignatureValidationError(f"{field}[{i}]",
                                           f"must be an integer in [2, {MAX_BRANCHING}]")
        out.append(int(b))
    if math.prod(out) > MAX_SUBNETS:
        raise SignatureValidationError(field, f"more than {MAX_SUBNETS} sub-nets")
    return tuple(out)


def _check_level(value: object, size: int, field: str) -> list[float]:
    if not isinstance(value, list | tuple):
        raise SignatureValidationError(field, "must be a list of probabilities")
    if len(value) != size:
        raise SignatureValidationError(field, f"must have {size} probabilities, got {len(value)}")
    out = []
    for j, p in enumerate(value):
        if not _is_number(p) or not math.isfinite(p):
            raise SignatureValidationError(f"{field}[{j}]", f"must be a finite number, got {p!r}")
        if p < 0:
            raise SignatureValidationError(f"{field}[{j}]", f"must not be negative, got {p}")
        out.append(float(p))
    total = math.fsum(out)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise SignatureValidationError(field, f"probabilities sum to {total:.6g}, not 1 "
                                              f"(tolerance {SUM_TOLERANCE})")
    return out


_KEYS = {"format", "version", "run_id", "branching", "levels", "count", "dp_epsilon"}


def check_run_id_format(value: object, field: str = "run_id") -> str | None:
    """None, or a run id as `run_id_of` writes it (16 lowercase hex digits)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise SignatureValidationError(field, f"must be null or {RUN_ID_HEX} lowercase hex "
                                              f"digits, got {str(value)[:40]!r}")
    return value


def validate_signature(obj: object, branching: Sequence[int] | None = None) -> Signature:
    """Check a decoded signature JSON object; `branching` is the registry's (None: any).

    `format` and `version` may be absent but must be right when present; unknown keys,
    wrong lengths, NaN/inf, negative values, levels not summing to 1, a count that is not
    a positive integer and a `run_id` that is not 16 hex digits are refused with the field
    named. Whether the run id is the right one is `check_run_id`'s job.
    """
    if not isinstance(obj, dict):
        raise SignatureValidationError("signature", "must be a JSON object")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise SignatureValidationError(unknown[0], "unknown field")
    if obj.get("format", SIGNATURE_FORMAT) != SIGNATURE_FORMAT:
        raise SignatureValidationError("format", f"must be {SIGNATURE_FORMAT!r}")
    version = obj.get("version", SIGNATURE_VERSION)
    if version != SIGNATURE_VERSION or isinstance(version, bool):
        raise SignatureValidationError("version", f"unsupported version {version!r} "
                                                  f"(this reader knows {SIGNATURE_VERSION})")
    if "branching" not in obj and branching is None:
        raise SignatureValidationError("branching", "missing")
    own = _check_branching(obj.get("branching", list(branching or ())), "branching")
    if branching is not None and own != tuple(int(b) for b in branching):
        raise SignatureValidationError(
            "branching", f"is {list(own)} but this server routes over {list(branching)}")
    levels = obj.get("levels")
    if not isinstance(levels, list | tuple):
        raise SignatureValidationError("levels", "must be a list with one list per level")
    if len(levels) != len(own):
        raise SignatureValidationError("levels", f"must have {len(own)} levels, got {len(levels)}")
    checked = [_check_level(level, own[r], f"levels[{r}]") for r, level in enumerate(levels)]
    count = obj.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SignatureValidationError("count", f"must be a positive integer, got {count!r}")
    eps = obj.get("dp_epsilon")
    if eps is not None and (not _is_number(eps) or not math.isfinite(eps) or eps <= 0):
        raise SignatureValidationError("dp_epsilon", f"must be null or a positive number, got {eps!r}")
    run_id = check_run_id_format(obj.get("run_id"))
    return Signature(own, checked, int(count), None if eps is None else float(eps), run_id)


def run_id_of(run_dir: str | Path) -> str | None:
    """The run's identity: sha256 prefix of its codebooks (None for a run without them)."""
    path = Path(run_dir) / RUN_ID_SOURCE
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:RUN_ID_HEX]


def served_run_id(run_dir: str | Path, kit_json: str | Path | None = None
                  ) -> tuple[str | None, bool]:
    """(run id, whether signatures must carry it) for routing against RUN_DIR.

    Signatures must carry the id unless the run's own kit (`kit_json`, default
    RUN_DIR/kit/kit.json) records none: a legacy run's clients cannot know it. A kit
    recording another run's id is logged: every signature made with it will be refused.
    """
    run_id = run_id_of(run_dir)
    path = Path(kit_json) if kit_json is not None else Path(run_dir) / "kit" / "kit.json"
    if run_id is None:
        log.warning("%s has no %s: signatures are not checked against the run", run_dir,
                    RUN_ID_SOURCE)
        return None, False
    if not path.is_file():
        return run_id, True
    try:
        kit_run = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        kit_run = None
    if kit_run is None:
        log.warning("%s records no run_id (kit made before run ids): signatures without one "
                    "are accepted", path)
        return run_id, False
    if kit_run != run_id:
        log.error("%s was made for run %s, not this run (%s): signatures computed with it "
                  "will be refused", path, kit_run, run_id)
    return run_id, True


def check_run_id(sig: Signature, run_id: str | None, required: bool = True) -> None:
    """Refuse a signature computed with another run's kit (or, when required, with no id)."""
    if run_id is None:
        return
    if sig.run_id is None:
        if required:
            raise SignatureValidationError(
                "run_id", f"missing: this server routes run {run_id} and needs signatures "
                          f"computed with its kit; {REFETCH_HINT}")
        return
    if sig.run_id != run_id:
        raise RunIdMismatchError(
            "run_id", f"is {sig.run_id} but this server routes run {run_id}: the signature was "
                      f"computed with another run's kit, whose digits mean other clusters; "
                      f"{REFETCH_HINT}")


def signature_from_sums(sums: Sequence[np.ndarray], count: int,
                        dp_epsilon: float | None = None, run_id: str | None = None) -> Signature:
    """Per-level sums of probabilities (or noisy, clipped sums) -> normalised signature.

    A level whose sums are all zero (possible only after DP clipping) becomes uniform.
    """
    levels = []
    for s in sums:
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, None)
        total = float(s.sum())
        levels.append((s / total if total > 0 else np.full(s.shape, 1.0 / s.size)).tolist())
    return Signature(tuple(len(s) for s in levels), levels, max(int(count), 1), dp_epsilon,
                     check_run_id_format(run_id))


def aggregate_signatures(sigs: Iterable[Signature]) -> Signature:
    """Image-count-weighted mean of several devices' signatures (the Flower server uses it).

    The result's `dp_epsilon` is the loosest (largest) contributor's, or None when any
    contributor sent an exact signature: each device's guarantee covers its own images.
    Signatures from different runs' kits (run ids differ) do not mix.
    """
    sigs = list(sigs)
    if not sigs:
        raise ValueError("aggregate_signatures needs at least one signature")
    branching, run_id = sigs[0].branching, sigs[0].run_id
    for i, s in enumerate(sigs):
        if s.branching != branching:
            raise SignatureValidationError(f"signature {i}", f"has branching {s.branching}, "
                                               f"expected {branching}")
        if s.run_id != run_id:
            raise RunIdMismatchError(f"signature {i}", f"computed with the kit of run {s.run_id}, "
                                     f"signature 0 with run {run_id}: every node needs the "
                                     "same kit")
    total = sum(s.count for s in sigs)
    sums = [sum(np.asarray(s.levels[r], dtype=np.float64) * s.count for s in sigs)
            for r in range(len(branching))]
    epsilons = [s.dp_epsilon for s in sigs]
    eps = None if any(e is None for e in epsilons) else max(epsilons)  # type: ignore[type-var]
    return signature_from_sums(sums, total, eps, run_id)


def route_signature(sig: Signature) -> Route:
    """Each level's digit by majority: the argmax of the mean probabilities (lowest on ties)."""
    return tuple(int(np.argmax(level)) for level in sig.as_arrays())


def route_score(sig: Signature, route: Sequence[int]) -> float:
    """sum_r log m_r[b_r] (see the module docstring)."""
    if len(route) != len(sig.branching):
        raise ValueError(f"route {tuple(route)} has {len(route)} digits, expected {len(sig.branching)}")
    total = 0.0
    for r, b in enumerate(route):
        if not 0 <= int(b) < sig.branching[r]:
            raise ValueError(f"route digit {b} at level {r} out of range [0, {sig.branching[r]})")
        total += math.log(max(float(sig.levels[r][int(b)]), PROB_FLOOR))
    return total


def all_routes(branching: Sequence[int]) -> list[Route]:
    """Every route in lexicographic order (same order as SDRnet.all_routes)."""
    routes: list[Route] = [()]
    for b in branching:
        routes = [r + (d,) for r in routes for d in range(int(b))]
    return routes


def route_score_grid(sig: Signature) -> np.ndarray:
    """Every sub-net's score, in `all_routes` order."""
    logs = [np.log(np.maximum(level, PROB_FLOOR)) for level in sig.as_arrays()]
    grid = logs[0]
    for lv in logs[1:]:
        grid = grid[..., None] + lv
    return grid.reshape(-1)


def rank_routes(scores: np.ndarray, branching: Sequence[int]) -> list[tuple[Route, float]]:
    """Scores in `all_routes` order -> (route, score) best first (ties: lexicographic order)."""
    routes = all_routes(branching)
    return [(routes[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]


def score_routes(sig: Signature) -> list[tuple[Route, float]]:
    """Every sub-net's score, best first (ties: lexicographic route order)."""
    return rank_routes(route_score_grid(sig), sig.branching)
