"""Does the fleet's re-rank pick as well as one device holding all the labels? Non-IID splits.

    python benchmarks/fleet_rerank.py --run runs/claim_r8/runs/seed0/sdr16 --seed 0 \
        [--unified runs/claim_r8/runs/seed0/unified] [--limit 0] [--nodes 4,10] \
        [--alphas iid,1,0.3,0.1] [--partitions 3] [--top-m 8] [--methods logme,knn] \
        [--cache runs/label_budget/features] --out runs/fleet_rerank/seed0.json
    python benchmarks/fleet_rerank.py --merge runs/fleet_rerank/seed*.json --out runs/fleet_rerank/all.json

A federation with `rerank` set (`sdr_edge.federated.fleet_rerank`) sends the aggregated
signature's top M to every node; each node scores them on its own training split (labelled, or
label-free by RankMe or the consensus score) and the server keeps the best image-weighted mean. This script replays that decision on the task
splits of `label_budget.py` (same feature cache, same yardstick: every sub-net's linear probe on
the task's test split, so routed − random is exact): the task's training split is partitioned
over N nodes, IID or by Dirichlet(alpha) over labels (`sdr_edge.federated.partition`, the
Simulation Engine's rule), `--partitions` times; with a labelled score (LogME, kNN, probe) a
node with fewer than two classes cannot score and is left out, as in the federation (where no
node can, the federation stops; here the draw counts as the signature route, and
`no_node_scored` says how often). Beside each fleet pick it reports the pick of one
device holding the whole training split (pooled) and how often the two agree. The signature
route (label-free) is the baseline. Prints a table and writes one JSON object (with the load
average); the fleet's cost is M sub-nets per node, once, before round 1. `--methods
consensus-fleet` replays the federation's default for `rerank = "consensus"`: one score from
every node's statistics (`sdr_edge.routing.fleet_consensus`, k-FED clusters of the whole fleet),
where `consensus` is each node clustering its own images (`rerank-consensus = "node"`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_budget  # noqa: E402  (the feature cache and the figures of the label-budget bench)

from sdr_edge.bench.paper_claim import unified_probe  # noqa: E402
from sdr_edge.federated.fleet_rerank import weighted_choice  # noqa: E402
from sdr_edge.federated.partition import partition  # noqa: E402
from sdr_edge.routing.fleet_consensus import fleet_consensus_logme  # noqa: E402
from sdr_edge.routing.route_ids import format_route_id  # noqa: E402
from sdr_edge.routing.transferability import (  # noqa: E402
    LABELLED_METHODS,
    RERANK_METHODS,
    TransferabilityError,
    score_candidates,
)

# The consensus from the nodes' pooled statistics (`sdr_edge.routing.fleet_consensus`), beside
# "consensus", where each node clusters its own images and the server averages the scores.
FLEET_CONSENSUS = "consensus-fleet"
BENCH_METHODS = (*RERANK_METHODS, FLEET_CONSENSUS)


def fleet_scores(feats: np.ndarray, labels: np.ndarray, shares: list[np.ndarray], method: str
                 ) -> tuple[dict[int, tuple[int, list[float]]], int]:
    """Each scoring node's (images, scores of every candidate) and how many nodes could not."""
    if method == FLEET_CONSENSUS:  # one score from the nodes' pooled statistics; all take part
        try:
            return {0: (len(labels), fleet_consensus_logme([[f[idx] for f in feats]
                                                            for idx in shares]))}, 0
        except TransferabilityError:
            return {}, len(shares)
    labelled = method in LABELLED_METHODS
    scored, skipped = {}, 0
    for node, idx in enumerate(shares):
        if labelled and len(np.unique(labels[idx])) < 2:  # the node's rerank_task refuses it
            skipped += 1
            continue
        try:
            scored[node] = (len(idx), score_candidates(method, [f[idx] for f in feats],
                                                       labels[idx] if labelled else None))
        except TransferabilityError:  # e.g. fewer images than the consensus score's clusters
            skipped += 1
    return scored, skipped


def evaluate(run: Path, task, seed: int, nodes: list[int], alphas: list[float | None],
             partitions: int, top_m: int, methods: list[str], cache: Path,
             unified: Path | None) -> dict:
    data = label_budget.subnet_features(run, task, seed, cache)
    acc, y = data["test_accuracy"], data["train_labels"]
    feats = data["train_features"][:top_m]
    unified_acc = None if unified is None else unified_probe(unified, task, seed)
    selected = label_budget.selection_pick(data, seed)
    row = {"run": str(run), "task": task.name, "seed": seed, "num_subnets": len(acc),
           "train_images": int(len(y)), "classes": int(len(np.unique(y))),
           "bundle_bytes": int(data["bundle_bytes"]), "unified_probe": unified_acc,
           "selected_route": format_route_id(data["routes"][selected]),
           "signature": label_budget.pick_points(acc, 0, selected), "pooled": {}, "fleet": {}}
    pooled_picks: dict[str, int] = {}
    for method in methods:
        t0 = time.perf_counter()
        one_device = "consensus" if method == FLEET_CONSENSUS else method  # the same on one
        if one_device not in pooled_picks:
            pooled_picks[one_device] = int(np.argmax(score_candidates(
                one_device, list(feats), y if method in LABELLED_METHODS else None)))
        pooled = pooled_picks[one_device]
        row["pooled"][method] = {**label_budget.pick_points(acc, pooled, selected),
                                 "seconds": time.perf_counter() - t0}
        for n in nodes:
            for alpha in alphas:
                picks, skipped, unscored = [], [], 0
                for p in range(partitions):
                    try:  # alpha None: IID
                        shares = partition(y, len(y), n, alpha, 1000 * seed + p)
                    except ValueError as exc:  # too few images for n nodes at this skew
                        raise SystemExit(f"{task.name}: {n} nodes, {skew_label(alpha_name(alpha))}"
                                         f": {exc}") from exc
                    scored, skip = fleet_scores(feats, y, shares, method)
                    skipped.append(skip)
                    unscored += not scored  # the federation stops; here: the signature route
                    picks.append(weighted_choice(scored)[1] if scored else 0)
                row["fleet"][f"{method}/{n}/{alpha_name(alpha)}"] = {
                    **label_budget.mean_points(
                        [label_budget.pick_points(acc, k, selected) for k in picks]),
                    "agrees_with_pooled": float(np.mean([k == pooled for k in picks])),
                    "nodes_skipped": float(np.mean(skipped)),
                    "no_node_scored": unscored / partitions}
    if unified_acc is not None:
        for entry in [row["signature"], *row["pooled"].values(), *row["fleet"].values()]:
            entry["minus_unified_points"] = entry["probe_points"] - 100.0 * unified_acc
    return row


def alpha_name(alpha: float | None) -> str:
    """The setting's name in the row keys: "iid" or the Dirichlet alpha."""
    return "iid" if alpha is None else f"{alpha:g}"


def skew_label(name: str) -> str:
    """How tables and errors write a setting named by alpha_name."""
    return "IID" if name == "iid" else f"Dirichlet {name}"


def summarize(rows: list[dict]) -> dict:
    def figures(get) -> dict:
        return {k: label_budget.pair_figures(rows, lambda r, k=k: get(r)[k]) for k in get(rows[0])}

    return {"pairs": len(rows), "signature": figures(lambda r: r["signature"]),
            "pooled": {m: figures(lambda r, m=m: r["pooled"][m]) for m in rows[0]["pooled"]},
            "fleet": {k: figures(lambda r, k=k: r["fleet"][k]) for k in rows[0]["fleet"]}}


def table(summary: dict) -> str:
    def cell(fig: dict) -> str:
        p = fig["pairs"]
        return f"{p['mean']:+.2f} ± {p['ci95']:.2f}" if p["ci95"] is not None else f"{p['mean']:+.2f}"

    def mean_of(o: dict, key: str, fmt: str) -> str:
        return format(o[key]["pairs"]["mean"], fmt) if key in o else ""

    def line(name: str, o: dict) -> str:
        unified = o.get("minus_unified_points")
        return (f"| {name} | {cell(o['minus_random_points'])} | "
                f"{o['minus_random_points']['positive_pairs']} | "
                f"{cell(unified) if unified else ''} | {o['regret_points']['pairs']['mean']:.2f} | "
                f"{label_budget.selection_regret(o)} | "
                f"{mean_of(o, 'agrees_with_pooled', '.2f')} | {mean_of(o, 'nodes_skipped', '.1f')} |")

    lines = ["| route choice | routed − random | pairs above random | routed − unified | regret "
             "| regret, selection fold (mean / worst task) | agrees with pooled "
             "| nodes that cannot score |", "|---|---|---|---|---|---|---|---|",
             line("signature (label-free)", summary["signature"])]
    lines += [line(f"{m}, one device with the whole split", o)
              for m, o in summary["pooled"].items()]
    for key, o in summary["fleet"].items():
        method, n, alpha = key.split("/")
        lines.append(line(f"{method}, {n} nodes, {skew_label(alpha)}", o))
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> int:
    rows = label_budget.read_rows(paths, "fleet_rerank.py")
    summary = summarize(rows)
    label_budget.write_merged(out, paths, summary, rows)
    print(table(summary))
    return 0


def alpha_list(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() == "iid":
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"alphas: 'iid' or numbers > 0, got {part!r}") from exc
        if not value > 0:
            raise argparse.ArgumentTypeError(f"alphas: Dirichlet alpha must be > 0, got {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("alphas: give at least one")
    return out


def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in BENCH_METHODS]
    if not methods or bad:
        raise argparse.ArgumentTypeError(f"methods: choose from {', '.join(BENCH_METHODS)}, "
                                         f"got {text!r}")
    return methods


def main(argv: list[str] | None = None) -> int:
    p = label_budget.run_parser(__doc__.split("\n")[0])
    p.add_argument("--nodes", type=label_budget.int_list, default=[4, 10], help="fleet sizes")
    p.add_argument("--alphas", type=alpha_list, default=alpha_list("iid,1,0.3,0.1"),
                   help="label skew: iid or Dirichlet alphas (default iid,1,0.3,0.1)")
    p.add_argument("--partitions", type=int, default=3, help="partition draws per setting")
    p.add_argument("--top-m", type=int, default=8, help="candidates the nodes score")
    p.add_argument("--methods", type=method_list, default=["logme", "knn"])
    args = label_budget.parse_run_args(p, argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.partitions < 1 or args.top_m < 2:
        p.error("--partitions must be >= 1 and --top-m >= 2")
    t0 = time.perf_counter()
    rows = []
    for run, seed, unified_run, task, subnets in label_budget.each_pair(p, args):
        rows.append(evaluate(run, task, seed, args.nodes, args.alphas, args.partitions,
                             min(args.top_m, subnets), args.methods,
                             args.cache or args.out.parent / "features", unified_run))
        print(task.name, seed, {k: round(v["minus_random_points"], 2)
                                for k, v in rows[-1]["fleet"].items()}, file=sys.stderr)
    summary = summarize(rows)
    label_budget.write_result(args.out, t0, summary, rows)
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
