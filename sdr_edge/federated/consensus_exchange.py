"""The fleet's consensus re-rank over Flower messages: three exchanges, the pooled score.

`sdr_edge.routing.fleet_consensus` computes the candidates' consensus score of the fleet's
pooled images from statistics each node sends. Here those statistics travel as `query.rerank`
messages with a `step`:

1. ``moments``: the candidates (as in the one-exchange re-rank). Each node extracts their
   features on all its images, keeps them in its run state, and replies with per-dimension
   count, sums and sums of squares.
2. ``centroids``: the fleet's standardiser and the clustering plan. Each node replies with its
   k-FED centroids and their sizes, one set per clustering.
3. ``statistics``: the fleet centroids of the clusterings kept. Each node labels its images by
   the nearest centroid and replies with its LogME statistics (Gram matrices, F^T Y, cluster
   sizes).

The server sums them and keeps the candidate with the best score (`consensus_on_fleet`). A node
that fails a step is left out of the later ones; the standardiser keeps its moments (a
standardiser over a few more images). Where no node is left, the re-rank fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.federated.fleet_rerank import (
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    RERANK_ACTION,
    Candidate,
    FleetRerank,
    candidates_content,
    content_nbytes,
)
from sdr_edge.federated.strategy import FederationError, reply_outcomes
from sdr_edge.routing.fleet_consensus import (
    MIN_CLUSTER_IMAGES,
    ColumnMoments,
    LogmeMoments,
    clustering_plan,
    column_moments,
    fleet_centroids,
    fleet_scores,
    fleet_standardiser,
    kept_clusterings,
    local_centroids,
    logme_moments,
    nearest,
    standardise,
)
from sdr_edge.routing.transferability import side_by_side

log = logging.getLogger(__name__)

STEP = "step"
MOMENTS, CENTROIDS, STATISTICS = "moments", "centroids", "statistics"
STEPS = (MOMENTS, CENTROIDS, STATISTICS)
FEATURES_STATE = "rerank-consensus-features"  # the node's features, kept between the steps
STATS = "statistics"  # the ArrayRecord of a step's message or reply


def _arrays(entries: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in entries.items()})


def _numpy(record: ArrayRecord, key: str) -> np.ndarray:
    if key not in record:
        raise ValueError(f"consensus message lacks array {key!r}")
    return np.asarray(record[key].numpy())


def _stats(content: RecordDict) -> ArrayRecord:
    if STATS not in content.array_records:
        raise ValueError("consensus message carries no statistics")
    return content.array_records[STATS]


# --- the node's side -------------------------------------------------------------------------

def node_moments(features: Sequence[np.ndarray], state: RecordDict | None) -> RecordDict:
    """Step 1 on a node: keep the features for the later steps, reply with their moments."""
    if state is None:
        raise ValueError("the fleet consensus needs the node's run state between its steps")
    state[FEATURES_STATE] = _arrays({str(i): f for i, f in enumerate(features)})
    m = column_moments(features)
    return RecordDict({STATS: _arrays({"sums": m.sums, "sumsq": m.sumsq}),
                       METRICS: _metrics(m.count)})


def _metrics(count: int) -> MetricRecord:
    return MetricRecord({NUM_EXAMPLES: count})


def _kept_features(state: RecordDict | None) -> list[np.ndarray]:
    if state is None or FEATURES_STATE not in state.array_records:
        raise ValueError("consensus step before the moments step: this node holds no features")
    record = state.array_records[FEATURES_STATE]
    return [_numpy(record, str(i)) for i in range(len(record))]


def _standardised_features(content: RecordDict, state: RecordDict | None
                           ) -> tuple[list[np.ndarray], np.ndarray]:
    features = _kept_features(state)
    stats = _stats(content)
    mean, std = _numpy(stats, "mean"), _numpy(stats, "std")
    if mean.shape != (len(features), features[0].shape[1]) or std.shape != mean.shape:
        raise ValueError(f"consensus standardiser has shape {mean.shape}, this node's features "
                         f"{(len(features), features[0].shape[1])}")
    blocks = standardise(features, mean, std)
    return blocks, side_by_side(blocks)


def node_centroids(content: RecordDict, state: RecordDict | None) -> RecordDict:
    """Step 2 on a node: k-FED's local centroids of each clustering in the plan."""
    blocks, x = _standardised_features(content, state)
    config = content.config_records[CONFIG]
    clusters, seeds = list(config.get("clusters", [])), list(config.get("seeds", []))
    min_images = int(config.get("min-images", MIN_CLUSTER_IMAGES))  # type: ignore[arg-type]
    out = {}
    for j, (k, seed) in enumerate(zip(clusters, seeds, strict=True)):
        centroids, sizes = local_centroids(x, int(k), int(seed), min_images)
        out[f"centroids-{j}"], out[f"sizes-{j}"] = centroids, sizes.astype(np.int64)
    return RecordDict({STATS: _arrays(out), METRICS: _metrics(len(x))})


def node_statistics(content: RecordDict, state: RecordDict | None) -> RecordDict:
    """Step 3 on a node: LogME statistics against the nearest fleet centroids. The last step:
    the kept features leave the run state here, whether the step succeeds or fails (a failed
    node is left out, never asked again), so the fine-tuning rounds after it do not carry them
    (N x M x D values; a ResNet-50's 2,048 dimensions make that gigabytes)."""
    try:
        blocks, x = _standardised_features(content, state)
        clusters = [int(k) for k in content.config_records[CONFIG].get("clusters", [])]
        stats = _stats(content)
        labels = [nearest(x, _numpy(stats, f"centroids-{j}")) for j in range(len(clusters))]
        m = logme_moments(blocks, labels, clusters)
    finally:
        if state is not None and FEATURES_STATE in state.array_records:
            del state[FEATURES_STATE]
    out = {"gram": m.gram}
    for j in range(len(clusters)):
        out[f"fty-{j}"], out[f"counts-{j}"] = m.fty[j], m.class_counts[j]
    return RecordDict({STATS: _arrays(out), METRICS: _metrics(m.count)})


NODE_STEPS: dict[str, Callable[[RecordDict, RecordDict | None], RecordDict]] = {
    CENTROIDS: node_centroids, STATISTICS: node_statistics}


# --- the server's side -----------------------------------------------------------------------

def _exchange(grid: Grid, nodes: Sequence[int], content: RecordDict, timeout: float,
              parse: Callable[[Message], object], sent: dict[int, int]
              ) -> tuple[dict[int, object], dict[int, str]]:
    """One step with `nodes`: their parsed replies and errors; adds each reply's array bytes
    to `sent` (what the node disclosed, for the summary)."""
    messages = [Message(content, dst_node_id=n,
                        message_type=f"{MessageType.QUERY}.{RERANK_ACTION}") for n in nodes]
    ok, errors = reply_outcomes(messages, list(grid.send_and_receive(messages, timeout=timeout)))
    parsed = {}
    for msg in ok:
        node = int(msg.metadata.src_node_id)
        sent[node] = sent.get(node, 0) + content_nbytes(msg.content)
        try:
            parsed[node] = parse(msg)
        except (ValueError, TypeError, KeyError) as exc:
            errors[node] = f"malformed consensus reply: {exc}"
    return parsed, errors


def _count(msg: Message) -> int:
    metrics = msg.content.metric_records.get(METRICS)
    if metrics is None:
        raise ValueError("reply carries no metrics")
    return int(metrics.get(NUM_EXAMPLES, 0))


def _parse_moments(shape: tuple[int, int]) -> Callable[[Message], ColumnMoments]:
    def parse(msg: Message) -> ColumnMoments:
        stats = _stats(msg.content)
        sums, sumsq = _numpy(stats, "sums"), _numpy(stats, "sumsq")
        if sums.shape != shape or sumsq.shape != shape:
            raise ValueError(f"moments of shape {sums.shape}, expected {shape}")
        return ColumnMoments(_count(msg), sums, sumsq)
    return parse


def _parse_centroids(plan: Sequence[tuple[int, int]], width: int):
    def parse(msg: Message) -> list[tuple[np.ndarray, np.ndarray]]:
        stats = _stats(msg.content)
        out = []
        for j, (k, _) in enumerate(plan):
            c, s = _numpy(stats, f"centroids-{j}"), _numpy(stats, f"sizes-{j}")
            if c.ndim != 2 or c.shape[1] != width or c.shape[0] > k or s.shape != (c.shape[0],):
                raise ValueError(f"centroids of shape {c.shape} for {k} clusters of width {width}")
            out.append((c, s))
        return out
    return parse


def _parse_statistics(clusters: Sequence[int], m: int, d: int):
    def parse(msg: Message) -> LogmeMoments:
        stats = _stats(msg.content)
        gram = _numpy(stats, "gram")
        if gram.shape != (m, d, d):
            raise ValueError(f"Gram matrices of shape {gram.shape}, expected {(m, d, d)}")
        fty, counts = [], []
        for j, k in enumerate(clusters):
            f, c = _numpy(stats, f"fty-{j}"), _numpy(stats, f"counts-{j}")
            if f.shape != (m, d, k) or c.shape != (k,):
                raise ValueError(f"F^T Y of shape {f.shape} for {k} clusters")
            fty.append(f)
            counts.append(c)
        return LogmeMoments(_count(msg), gram, fty, counts)
    return parse


def _step_content(step: str, config: dict, arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"method": "consensus", STEP: step, **config}),
                       STATS: _arrays(arrays)})


def consensus_on_fleet(grid: Grid, candidates: Sequence[Candidate], spec: InputSpec,
                       num_classes: int, timeout: float,
                       min_images: int = MIN_CLUSTER_IMAGES) -> FleetRerank:
    """Run the three exchanges with every connected node and pick the best-scored candidate."""
    t0 = time.perf_counter()
    content = candidates_content(candidates, spec, num_classes, "consensus")
    content[CONFIG][STEP] = MOMENTS
    nodes = sorted(grid.get_node_ids())
    m = len(candidates)
    d = next(iter(candidates)).backbone.feature_dim
    log.info("fleet consensus over %d candidate(s) on %d node(s) (%d bytes each)", m,
             len(nodes), content_nbytes(content))
    sent: dict[int, int] = {}
    moments, errors = _exchange(grid, nodes, content, timeout, _parse_moments((m, d)), sent)

    def alive() -> list[int]:
        return sorted(n for n in moments if n not in errors)

    def fail(stage: str) -> FederationError:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(errors.items()))
        return FederationError(f"re-rank by consensus: no node {stage} "
                               f"({reasons or 'no node connected'})")

    if not moments:
        raise fail(f"scored the {m} candidates")
    mean, std = fleet_standardiser(list(moments.values()))
    plan = clustering_plan(sum(p.count for p in moments.values()))
    step2 = _step_content(CENTROIDS, {"clusters": [k for k, _ in plan],
                                      "seeds": [s for _, s in plan], "min-images": min_images},
                          {"mean": mean, "std": std})
    local, err2 = _exchange(grid, alive(), step2, timeout, _parse_centroids(plan, m * d), sent)
    errors.update(err2)
    if not local:
        raise fail("sent centroids")
    clusters, centroids = kept_clusterings(plan, [
        fleet_centroids([local[n][j] for n in sorted(local)], k, seed)
        for j, (k, seed) in enumerate(plan)], min_images)
    step3 = _step_content(STATISTICS, {"clusters": clusters},
                          {"mean": mean, "std": std,
                           **{f"centroids-{j}": c for j, c in enumerate(centroids)}})
    stats, err3 = _exchange(grid, alive(), step3, timeout, _parse_statistics(clusters, m, d),
                            sent)
    errors.update(err3)
    if not stats:
        raise fail("sent LogME statistics")
    scores = fleet_scores([stats[n] for n in sorted(stats)])
    best = max(range(m), key=lambda i: (scores[i], -i))
    for node, reason in sorted(errors.items()):
        log.warning("node %d left out of the fleet consensus: %s", node, reason)
    result = FleetRerank("consensus", [c.route for c in candidates],
                         [c.routing_score for c in candidates], scores, best,
                         {n: {"num_examples": stats[n].count, "bytes_sent": sent[n]}
                          for n in sorted(stats)},
                         errors, content_nbytes(content), time.perf_counter() - t0)
    log.info("fleet consensus over %d image(s) on %d node(s), %d clusterings: route %s "
             "(signature route %s)", sum(s.count for s in stats.values()), len(stats),
             len(clusters), list(result.route), list(result.routes[0]))
    return result
