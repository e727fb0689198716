"""Negative transfer on a pool of distinct domains (the paper's preliminary experiment).

    python benchmarks/negative_transfer.py [--epochs 18] [--pool-limit 12000] [--seeds 3]
        [--task-limit 2000] [--threads 1] [--out runs/negative_transfer]

Pre-trains the same small backbone with unified SimSiam for the same epochs on Fashion-MNIST
only, printed Latin + Cyrillic glyphs only, and both; linear-probes each task of
sdr_edge.bench.domains over `--seeds` splits; prints the JSON last and writes results.json and
results.md under --out. Finished pre-training runs are reused on a rerun. Run it alone: it is
CPU-bound and its timings mean nothing on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdr_edge.bench.domains import NegativeTransferConfig, run_negative_transfer


def _limit(text: str) -> int | None:
    value = int(text)
    return None if value <= 0 else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=18, help="pre-training epochs, every pool")
    parser.add_argument("--pool-limit", type=_limit, default=12000,
                        help="images per domain (0: all); the whole pool has both domains")
    parser.add_argument("--seeds", type=int, default=3, help="probe split seeds per task")
    parser.add_argument("--task-limit", type=_limit, default=2000,
                        help="images per task (0: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (small convs run faster single-threaded)")
    parser.add_argument("--budget", default="cpu",
                        help="backbone/SSL settings of this bench budget (cpu, minute, full)")
    parser.add_argument("--out", default="runs/negative_transfer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = NegativeTransferConfig(epochs=args.epochs, pool_limit=args.pool_limit,
                                 seeds=args.seeds, task_limit=args.task_limit,
                                 threads=args.threads, budget=args.budget)
    try:
        result = run_negative_transfer(cfg, args.out)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"negative_transfer: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
