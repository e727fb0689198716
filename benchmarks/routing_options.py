"""Routing options side by side: signature route vs device-side re-ranking of the top M.

    python benchmarks/routing_options.py --run RUN_DIR [--run RUN_DIR2 ...] \
        --task footwear-3=fashion-mnist:test@5,7,9 --task digits=builtin:digits \
        [--top-m 8] [--labels-per-class 10] [--seeds 3] [--limit 2000]

Each --run is one pre-trained SDRnet (e.g. one per pre-training seed); each seed also redraws
the task split and the few labels. Prints one JSON object: per option (signature, rankme,
logme, knn) the mean and 95 % t-interval of regret (points below the best of the top M),
routed − random (points above the mean of random routes), bytes downloaded and device seconds,
over every (run, task, seed); plus the load average, since the seconds depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from sdr_edge.bench.paper_claim import interval  # mean, std, 95 % t-interval
from sdr_edge.routing.rerank_eval import OPTIONS, evaluate_rerank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="SDRnet run dir (repeatable)")
    p.add_argument("--task", action="append", required=True, help="NAME=SOURCE (repeatable)")
    p.add_argument("--top-m", type=int, default=8)
    p.add_argument("--random-routes", type=int, default=8)
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=2000, help="images per task (0: all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t.split("=", 1) for t in args.task]
    if any(len(t) != 2 for t in tasks):
        p.error("--task must be NAME=SOURCE")
    t0 = time.perf_counter()
    rows = []
    for run in args.run:
        for name, source in tasks:
            for seed in range(args.seeds):
                res = evaluate_rerank(run, source, top_m=args.top_m,
                                      random_routes=args.random_routes,
                                      labels_per_class=args.labels_per_class,
                                      image_limit=args.limit or None, seed=seed)
                rows.append({"run": run, "task": name, "seed": seed,
                             **{k: res[k] for k in ("best_of_top_m_probe", "random_mean_probe")},
                             "options": res["options"]})
                print(name, seed, {o: round(r["probe"], 4) for o, r in res["options"].items()},
                      file=sys.stderr)
    summary = {
        "command": " ".join(sys.argv),
        "seconds": time.perf_counter() - t0,
        "load_average": os.getloadavg(),
        "runs": args.run, "tasks": dict(tasks), "seeds": args.seeds, "top_m": args.top_m,
        "labels_per_class": args.labels_per_class,
        "options": {o: {m: interval([r["options"][o][m] for r in rows])
                        for m in ("regret_points", "minus_random_points", "bytes",
                                  "device_seconds")} for o in OPTIONS},
        "per_task": {name: {o: interval([r["options"][o]["minus_random_points"] for r in rows
                                         if r["task"] == name]) for o in OPTIONS}
                     for name, _ in tasks},
        "rows": rows,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
