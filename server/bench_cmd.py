"""Measure the paper's claim: routed sub-nets vs the unified model and controls, over seeds.

Pre-trains the unified model and SDRnets with K = 16 and K = 256 on the budget's pool (default
fashion-mnist:train; same backbone, same total epochs), then on each downstream task compares
the routed sub-net's linear-probe and fine-tune accuracy with the unified model, the SDR run's
phase-0 teacher, R random routes and the lowest-scored route, and measures the route's regret.
--seeds N repeats pre-training and the task splits and reports mean ± 95 % interval. Writes
OUT/results.json, OUT/results.md and OUT/report/index.html. Rerunning reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# sdr_edge.bench.recipes.RECIPES, kept here so that building the parser imports no torch
# (tests/apps/server_cli checks that the two agree)
RECIPE_NAMES = ("base", "kd0", "kd0.9", "experts", "lr0.2", "lr1", "lr2", "elr", "coarse4", "deep2",
                "shallow-coarse", "early", "long", "crop0.3", "clamped", "tree")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default="cpu", choices=("minute", "cpu", "full"),
                        help="cpu: < 60 min on 2 CPU cores (default); full: a GPU; "
                             "minute: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_claim"), metavar="DIR")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="repeat pre-training and task splits for seeds SEED..SEED+N-1 and "
                             "report mean ± 95 %% interval (default 1; the verdict needs >= 2)")
    parser.add_argument("--pool", metavar="SOURCE",
                        help="unlabeled pre-training pool (default: the budget's, "
                             "fashion-mnist:train)")
    parser.add_argument("--pool-limit", type=int, metavar="N",
                        help="images of the pool (default: the budget's; 0: all; a mix: pool "
                             "splits them evenly over its parts)")
    parser.add_argument("--task-set", choices=("fashion", "domains"),
                        help="downstream tasks: fashion (default; fashion-10, footwear-3, tops-4, "
                             "digits-10) or domains (the mixed-pool tasks of "
                             "sdr_edge.bench.domains; the pool defaults to its mixed pool)")
    parser.add_argument("--random-routes", type=int, metavar="R",
                        help="random routes probed as the routed sub-net's control (default: "
                             "the budget's, 8; minute: 2)")
    parser.add_argument("--kd-weight", type=float, metavar="W",
                        help="SiamKD weight of the SDR runs (default: the budget's; the unified "
                             "run never distils)")
    parser.add_argument("--task-limit", type=int, metavar="N",
                        help="images per downstream task (default: the budget's; 0: all)")
    parser.add_argument("--recipes", metavar="LIST",
                        help="instead of the claim, compare SDR recipes on one teacher per seed "
                             "(comma-separated; join recipes with '+'; base always runs): "
                             f"{', '.join(RECIPE_NAMES)}. "
                             "Writes OUT/recipes.json and OUT/recipes.md")


def run(args: argparse.Namespace) -> int:
    if args.recipes:
        return _run_recipes(args)
    from sdr_edge.bench.paper_claim import run as run_bench

    summary = run_bench(args.budget, args.out, args.seed, task_limit=args.task_limit,
                        kd_weight=args.kd_weight, seeds=args.seeds, pool=args.pool,
                        task_set=args.task_set, random_routes=args.random_routes,
                        pool_limit=args.pool_limit)
    print((args.out / "results.md").read_text())
    v = summary["verdict"]  # the full claims with their intervals are in results.json
    brief = {k: x for k, x in v.items() if k != "claims"}
    brief["claims"] = {name: c["holds"] for name, c in v["claims"].items()}
    print(json.dumps(brief, indent=2))
    return 0


def _run_recipes(args: argparse.Namespace) -> int:
    from sdr_edge.bench.recipes import run as run_recipes

    if args.kd_weight is not None:
        print("sdr-server bench: --kd-weight does not apply to --recipes (use kd0 or kd0.9)",
              file=sys.stderr)
        return 2
    run_recipes(args.budget, args.out, args.recipes, args.seed, args.seeds,
                task_limit=args.task_limit, pool=args.pool, task_set=args.task_set,
                random_routes=args.random_routes, pool_limit=args.pool_limit)
    print((args.out / "recipes.md").read_text())
    return 0
