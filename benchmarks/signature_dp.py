"""What a differentially private signature costs in routing: routes unchanged vs epsilon and n.

A simulated device holds n images of a few classes of a labelled source (a non-IID client, the
usual federated case). Its exact signature routes to some sub-net; the same device releasing
an epsilon-DP signature (sdr_edge.routing.privacy) may route elsewhere. For each task size n
and epsilon this prints, over `trials` random tasks, the fraction of whole routes and of
level-1 digits unchanged, the mean L1 error of the released per-level means, and the mean loss
in routing score (exact signature's log-score of the exact route minus that of the DP route,
in nats; 0 when the route is unchanged). The kit runs once over the source (ONNX Runtime,
1 thread); tasks are index subsets of those probabilities.

    nice .venv/bin/python benchmarks/signature_dp.py --run RUN_DIR [--source fashion-mnist:test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sdr_edge.artifacts.run_dir import KIT_DIR
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.routing.privacy import private_signature
from sdr_edge.routing.signature import route_score, route_signature, signature_from_sums


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--source", default="fashion-mnist:test")
    p.add_argument("--sizes", default="20,100,500,2000")
    p.add_argument("--epsilons", default="0.1,0.5,1,2,5,10")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--classes-per-task", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sdr_edge.routing.kit_runtime import KitRunner

    runner = KitRunner(args.run / KIT_DIR, threads=1)
    src = load_source(args.source, runner.spec.image_size, runner.spec.channels)
    if src.labels is None:
        raise SystemExit(f"{args.source} has no labels: tasks are built from classes")
    probs = []
    for start in tqdm(range(0, len(src), 512), desc="kit over source", leave=False):
        batch = normalize_batch(src.images[start:start + 512], runner.spec)
        probs.append([p.astype(np.float64) for p in runner.probabilities(batch)])
    levels = [np.concatenate([b[r] for b in probs]) for r in range(len(runner.branching))]
    by_class = [np.flatnonzero(src.labels == c) for c in np.unique(src.labels)]
    rng = np.random.default_rng(args.seed)
    sizes, epsilons = [int(v) for v in _floats(args.sizes)], _floats(args.epsilons)
    rows = []
    for n in tqdm(sizes, desc="task sizes", leave=False):
        stats = {e: {"route": 0, "level1": 0, "l1": 0.0, "score_loss": 0.0} for e in epsilons}
        for _ in range(args.trials):
            classes = rng.choice(len(by_class), args.classes_per_task, replace=False)
            pool = np.concatenate([by_class[c] for c in classes])
            idx = rng.choice(pool, n, replace=n > len(pool))
            sums = [lv[idx].sum(axis=0) for lv in levels]
            exact = signature_from_sums(sums, n)
            route = route_signature(exact)
            for e in epsilons:
                dp = private_signature(sums, n, e, rng)
                dp_route = route_signature(dp)
                s = stats[e]
                s["route"] += dp_route == route
                s["level1"] += dp_route[0] == route[0]
                s["l1"] += float(np.mean([np.abs(np.subtract(a, b)).sum()
                                          for a, b in zip(dp.levels, exact.levels, strict=True)]))
                s["score_loss"] += route_score(exact, route) - route_score(exact, dp_route)
        for e in epsilons:
            s = stats[e]
            rows.append({"n": n, "epsilon": e,
                         "route_unchanged": s["route"] / args.trials,
                         "level1_unchanged": s["level1"] / args.trials,
                         "mean_l1_error_per_level": round(s["l1"] / args.trials, 5),
                         "mean_score_loss_nats": round(s["score_loss"] / args.trials, 5)})
    print(json.dumps({"benchmark": "signature_dp", "run": str(args.run), "source": args.source,
                      "branching": list(runner.branching), "trials": args.trials,
                      "classes_per_task": args.classes_per_task,
                      "mechanism": "Laplace on per-level sums and count, b = (R+1)/epsilon",
                      "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
