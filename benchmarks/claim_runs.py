"""Pre-train some of the claim table's runs for more seeds, without evaluating them.

    python benchmarks/claim_runs.py --seed 3 --only unified,sdr16 --out runs/claim_r8

`sdr-server bench` pre-trains the unified model and the K = 16 and K = 256 SDRnets of a seed
and then evaluates all three (about an hour a seed here). The per-sub-net benches
(`label_budget.py`, `fleet_rerank.py`, `label_free_scores.py`) need only the runs, often only
unified + K = 16: this trains those with the very configs of `sdr-server bench --budget cpu
--task-set domains --pool-limit 12000 --seed S` (`paper_claim.pretrain_all`), into the same
`OUT/runs/seedS/` folders, resumable, so a later bench call reuses them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.bench.paper_claim import PRETRAIN_RUNS, pretrain_all, resolve_budget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, action="append", required=True, help="repeatable")
    p.add_argument("--only", default="unified,sdr16",
                   help=f"comma-separated, of {','.join(PRETRAIN_RUNS)} (default unified,sdr16)")
    p.add_argument("--budget", default="cpu")
    p.add_argument("--task-set", default="domains")
    p.add_argument("--pool-limit", type=int, default=12000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    budget = resolve_budget(args.budget, task_set=args.task_set, pool_limit=args.pool_limit)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    for seed in args.seed:
        for name, path in pretrain_all(budget, args.out, seed, only=only).items():
            print(name, seed, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
