"""Measure the paper's claim: routed sub-nets vs the unified model on four downstream tasks.

Pre-trains the unified model and SDRnets with K = 16 and K = 256 on fashion-mnist:train (same
backbone, same total epochs), then for fashion-10, footwear-3, tops-4 and digits-10 compares
linear-probe and fine-tune accuracy and the route's regret. Writes OUT/results.json,
OUT/results.md and OUT/report/index.html. Rerunning the same command reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default="cpu", choices=("minute", "cpu", "full"),
                        help="cpu: < 60 min on 2 CPU cores (default); full: a GPU; "
                             "minute: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_claim"), metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kd-weight", type=float, metavar="W",
                        help="SiamKD weight of the SDR runs (default: the budget's; the unified "
                             "run never distils)")
    parser.add_argument("--task-limit", type=int, metavar="N",
                        help="images per downstream task (default: the budget's; 0: all)")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.bench.paper_claim import run as run_bench

    summary = run_bench(args.budget, args.out, args.seed, task_limit=args.task_limit,
                        kd_weight=args.kd_weight)
    print((args.out / "results.md").read_text())
    print(json.dumps(summary["verdict"], indent=2))
    return 0
