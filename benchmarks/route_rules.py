"""Routing rules on the same probed sub-nets: per-level marginals vs each image's whole code.

    python benchmarks/route_rules.py --run runs/claim_r8/runs/seed0/sdr16 --seed 0 \
        [--run ... --seed 1 ...] [--limit 0] --out runs/route_rules.json

Each --run pairs with the --seed at the same position (the task split seed; the bench uses the
pre-training seed); the tasks are the mixed pool's (`sdr_edge.bench.domains`). For every
(run, task) the kit's per-image probabilities on the train split give each rule's ranking
(`sdr_edge.routing.joint`: marginal = today's signature score, joint, mode); sub-nets are
linear-probed on the test split: all of them when the SDRnet has at most `--all-up-to`
sub-nets, else each rule's top 3 and R seeded random routes. Per rule: routed accuracy, routed −
random (random: the mean over every other sub-net when all are probed, else over the R random
routes), how often the rules agree, and the label ceiling (the route a selection fold of the
train split picks). Prints one JSON object (with the load average) and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from sdr_edge.artifacts.run_dir import KIT_DIR, load_sdrnet
from sdr_edge.bench.domains import domain_tasks
from sdr_edge.bench.paper_claim import interval, task_split
from sdr_edge.routing.evaluate import random_control_routes, selection_accuracy
from sdr_edge.routing.joint import RULES, ranked_routes
from sdr_edge.routing.kit_runtime import KitRunner
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy
from sdr_edge.routing.route_ids import format_route_id
from sdr_edge.routing.signature import all_routes


def kit_probabilities(runner: KitRunner, images: np.ndarray, batch: int = 512) -> list[np.ndarray]:
    """Per-level N x B_r kit probabilities of uint8 NHWC images at the kit's input size."""
    parts = [runner.image_probabilities(images[i:i + batch]) for i in range(0, len(images), batch)]
    return [np.concatenate([p[r] for p in parts]) for r in range(len(runner.branching))]


def evaluate(run: Path, task, seed: int, all_up_to: int, random_routes: int) -> dict:
    net, spec = load_sdrnet(run)
    runner = KitRunner(run / KIT_DIR)
    x_tr, y_tr, x_te, y_te = task_split(task, spec, seed)
    probs = kit_probabilities(runner, x_tr)
    ranked = {rule: ranked_routes(rule, probs) for rule in RULES}
    routed = {rule: ranked[rule][0][0] for rule in RULES}
    exhaustive = net.num_subnets <= all_up_to
    if exhaustive:
        probe_set, randoms = all_routes(net.branching), []
    else:
        randoms = random_control_routes(net.branching, routed["marginal"], random_routes, seed)
        tops = [r for rule in RULES for r, _ in ranked[rule][:3]]
        probe_set = list(dict.fromkeys(tops + randoms))
    acc, sel_acc = {}, {}
    for route in tqdm(probe_set, desc=f"{task.name} sub-nets", leave=False):
        backbone = net.extract(route).eval()
        f_tr, f_te = extract_features(backbone, x_tr, spec), extract_features(backbone, x_te, spec)
        acc[route] = linear_probe_accuracy(f_tr, y_tr, f_te, y_te, seed=seed)
        sel_acc[route] = selection_accuracy(f_tr, y_tr, seed)
    picked = max(probe_set, key=sel_acc.__getitem__)  # ties: the first probed
    controls = probe_set if exhaustive else randoms
    row = {"run": str(run), "task": task.name, "seed": seed, "num_subnets": net.num_subnets,
           "exhaustive": exhaustive, "probed": len(probe_set),
           "label_pick_probe": acc[picked], "best_probe": max(acc.values()),
           "accuracy": {format_route_id(r): a for r, a in acc.items()}, "rules": {}}
    for rule in RULES:
        random_mean = float(np.mean([acc[r] for r in controls if r != routed[rule]]))
        scores = dict(ranked[rule])
        rho = spearmanr([scores[r] for r in probe_set], [acc[r] for r in probe_set]).statistic
        row["rules"][rule] = {
            "route": list(routed[rule]), "probe": acc[routed[rule]], "random_mean": random_mean,
            "minus_random_points": 100.0 * (acc[routed[rule]] - random_mean),
            "minus_marginal_points": 100.0 * (acc[routed[rule]] - acc[routed["marginal"]]),
            "spearman": None if np.isnan(rho) else float(rho)}
    row["ceiling_minus_random_points"] = 100.0 * (acc[picked]
                                                  - np.mean([acc[r] for r in controls]))
    return row


def summarize(rows: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    out = {}
    for rule in RULES:
        vals = {m: [r["rules"][rule][m] for r in rows]
                for m in ("minus_random_points", "minus_marginal_points", "probe")}
        per_seed = [float(np.mean([r["rules"][rule]["minus_random_points"] for r in rows
                                   if r["seed"] == s])) for s in seeds]
        out[rule] = {"pairs": {m: interval(v) for m, v in vals.items()},
                     "seeds_minus_random": interval(per_seed), "per_seed_minus_random": per_seed,
                     "positive_pairs": sum(v > 0 for v in vals["minus_random_points"]),
                     "same_route_as_marginal": sum(r["rules"][rule]["route"]
                                                   == r["rules"]["marginal"]["route"]
                                                   for r in rows)}
    out["ceiling_minus_random_points"] = interval([r["ceiling_minus_random_points"] for r in rows])
    out["per_task_minus_random"] = {
        t: {rule: interval([r["rules"][rule]["minus_random_points"] for r in rows
                            if r["task"] == t]) for rule in RULES}
        for t in dict.fromkeys(r["task"] for r in rows)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, type=Path, help="SDRnet run dir")
    p.add_argument("--seed", action="append", type=int, help="task split seed of each --run")
    p.add_argument("--limit", type=int, default=0, help="images per task (0: all)")
    p.add_argument("--all-up-to", type=int, default=64, help="probe every sub-net up to this K")
    p.add_argument("--random-routes", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    seeds = args.seed or list(range(len(args.run)))
    if len(seeds) != len(args.run):
        p.error("give one --seed per --run")
    torch.set_num_threads(args.threads)
    limit = args.limit or None
    task_list = domain_tasks(limit)
    t0 = time.perf_counter()
    rows = []
    for run, seed in zip(args.run, seeds, strict=True):
        for task in task_list:
            rows.append(evaluate(run, task, seed, args.all_up_to, args.random_routes))
            print(task.name, seed, {k: round(v["minus_random_points"], 2)
                                    for k, v in rows[-1]["rules"].items()}, file=sys.stderr)
    result = {"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
              "load_average": os.getloadavg(), "summary": summarize(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
