"""Re-rank the aggregated signature's top-M sub-nets on the fleet, before any fine-tuning.

The signature route is label-free and sees only how similar the nodes' images are to the
pre-training clusters; on the mixed pool it beats a random sub-net by +0.4 points, while LogME
on 10 labelled images per class over the top 8 beats it by +1.9 (docs/claim.md, "A few labels on the
device"). A fleet holds those labels already: its nodes fine-tune on them. So the server sends
the top M candidates once (query.rerank), every node extracts their features on its labelled
training split and replies with one score per candidate (LogME, kNN, the CV probe, or RankMe
without labels) and its image count, and the server keeps the candidate with the best
image-weighted mean score. Nothing but M numbers per node leaves a device: no features, no
labels (the signature already revealed the image count).

Why a weighted mean: LogME is a per-image evidence (the log marginal likelihood divided by N,
You et al. 2021), kNN and the probe are accuracies, so sum_i n_i * score_i / sum_i n_i is the
score of the fleet's images each judged on its own node, the quantity a node-local fine-tune
sees. A node that cannot score (one class only, too few images for the probe's folds) answers
with an error and is left out; the run fails only when no node scores.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.federated.records import arrays_nbytes, describe_model, model_to_arrays
from sdr_edge.federated.strategy import FederationError, reply_outcomes
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.resnet import Backbone

log = logging.getLogger(__name__)

RERANK_ACTION = "rerank"  # message type "query.rerank": score the candidates on local data
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"


def candidate_key(i: int) -> str:
    """Record name of candidate i: a ConfigRecord (its description) and an ArrayRecord (weights)
    of the same index, `candidate-i` and `candidate-i-arrays`."""
    return f"candidate-{i}"


def score_key(i: int) -> str:
    return f"score-{i}"


@dataclass(frozen=True)
class Candidate:
    """One of the signature's top M: its route, its routing score and its backbone."""

    route: tuple[int, ...]
    routing_score: float
    backbone: Backbone


@dataclass
class FleetRerank:
    """What the fleet said of the candidates, and the one it picked."""

    method: str
    routes: list[tuple[int, ...]]
    routing_scores: list[float]
    scores: list[float]
    index: int
    node_scores: dict[int, dict] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    bytes_per_node: int = 0
    seconds: float = 0.0

    @property
    def route(self) -> tuple[int, ...]:
        return self.routes[self.index]

    def to_dict(self) -> dict:
        """The summary's (and the bundle provenance's) record of the choice."""
        return {
            "method": self.method,
            "top_m": len(self.routes),
            "signature_route": list(self.routes[0]),
            "route": list(self.route),
            "candidates": [{"route": list(r), "routing_score": round(rs, 6),
                            "fleet_score": round(s, 6)}
                           for r, rs, s in zip(self.routes, self.routing_scores, self.scores,
                                               strict=True)],
            "nodes_scored": sorted(self.node_scores),
            "node_scores": {str(k): v for k, v in sorted(self.node_scores.items())},
            "images_scored": sum(int(v["num_examples"]) for v in self.node_scores.values()),
            "node_errors": {str(k): v for k, v in sorted(self.errors.items())},
            "bytes_per_node": self.bytes_per_node,
            "seconds": round(self.seconds, 2),
        }


def candidates_content(candidates: Sequence[Candidate], spec: InputSpec, num_classes: int,
                       method: str) -> RecordDict:
    """The query.rerank message: the method, and each candidate as architecture + weights.

    Each backbone travels inside a SubnetModel with an untrained head of the fleet's class count,
    the form `records.model_from_message` rebuilds (a node ignores the head: it scores features).
    """
    content = RecordDict({CONFIG: ConfigRecord({"method": method,
                                                "candidates": len(candidates)})})
    for i, cand in enumerate(candidates):
        model = SubnetModel(cand.backbone, num_classes).eval()
        content[candidate_key(i)] = ConfigRecord(describe_model(model, spec, cand.route))
        content[f"{candidate_key(i)}-arrays"] = model_to_arrays(model)
    return content


def content_nbytes(content: RecordDict) -> int:
    """Weight bytes one node downloads for the re-rank (every candidate's arrays)."""
    return sum(arrays_nbytes(rec) for rec in content.array_records.values())


def _parse_scores(msg: Message, count: int) -> tuple[int, list[float]]:
    metrics = msg.content.metric_records.get(METRICS)
    if metrics is None:
        raise ValueError("reply carries no metrics")
    n = int(metrics.get(NUM_EXAMPLES, 0))
    if n <= 0:
        raise ValueError(f"reply scores {n} images")
    scores = [float(metrics.get(score_key(i), math.nan)) for i in range(count)]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"reply lacks a finite score for each of the {count} candidates")
    return n, scores


def weighted_choice(node_scores: dict[int, tuple[int, list[float]]]
                    ) -> tuple[list[float], int]:
    """Image-weighted mean score per candidate and the best one (ties: the better-routed,
    i.e. earlier, candidate)."""
    total = sum(n for n, _ in node_scores.values())
    count = len(next(iter(node_scores.values()))[1])
    means = [sum(n * s[i] for n, s in node_scores.values()) / total for i in range(count)]
    return means, max(range(count), key=lambda i: (means[i], -i))


def rerank_on_fleet(grid: Grid, candidates: Sequence[Candidate], spec: InputSpec,
                    num_classes: int, method: str, timeout: float) -> FleetRerank:
    """Send the candidates to every connected node, collect their scores, pick the best."""
    t0 = time.perf_counter()
    content = candidates_content(candidates, spec, num_classes, method)
    nodes = sorted(grid.get_node_ids())
    log.info("re-ranking %d candidate(s) by %s on %d node(s) (%d bytes each)", len(candidates),
             method, len(nodes), content_nbytes(content))
    messages = [Message(content, dst_node_id=n,
                        message_type=f"{MessageType.QUERY}.{RERANK_ACTION}") for n in nodes]
    ok, errors = reply_outcomes(messages, list(grid.send_and_receive(messages, timeout=timeout)))
    parsed: dict[int, tuple[int, list[float]]] = {}
    for msg in ok:
        node = int(msg.metadata.src_node_id)
        try:
            parsed[node] = _parse_scores(msg, len(candidates))
        except (ValueError, TypeError) as exc:
            errors[node] = f"malformed re-rank reply: {exc}"
    for node, reason in sorted(errors.items()):
        log.warning("node %d did not score the candidates: %s", node, reason)
    if not parsed:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(errors.items()))
        raise FederationError(f"re-rank by {method}: no node scored the {len(candidates)} "
                              f"candidates ({reasons or 'no node connected'})")
    means, best = weighted_choice(parsed)
    result = FleetRerank(method, [c.route for c in candidates],
                         [c.routing_score for c in candidates], means, best,
                         {n: {"num_examples": v[0], "scores": [round(s, 6) for s in v[1]]}
                          for n, v in sorted(parsed.items())},
                         errors, content_nbytes(content), time.perf_counter() - t0)
    log.info("fleet re-rank by %s over %d image(s) on %d node(s): route %s (signature route %s)",
             method, sum(v[0] for v in parsed.values()), len(parsed), list(result.route),
             list(result.routes[0]))
    return result
