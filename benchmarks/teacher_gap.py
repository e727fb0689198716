"""Where the routed sub-net loses to the unified model: the phase-0 teacher beside both.

    python benchmarks/teacher_gap.py 6 7 8 9 10 11 [--runs runs/claim_r8/runs] [--fresh runs/fresh]

For each seed, every domain task on its whole set: the linear probe of the SDRnet's phase-0
teacher (`sdr16/teacher.safetensors`), of the unified model, and the mean over the SDRnet's
sub-nets (from `label_budget.py`'s output FRESH/sdr16_seedS.json), so that "sub-nets − teacher"
(what the level phases add) and "unified − teacher" (what 18 epochs on everything add) can be
read per seed. Writes FRESH/teacher_probe_SEEDS.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sdr_edge.bench.domains import domain_tasks
from sdr_edge.bench.paper_claim import unified_probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_budget  # noqa: E402  (its outputs' rows, read with its one-line error)


def seed_gaps(seed: int, runs: Path, fresh: Path) -> dict[str, dict[str, float]]:
    """task -> probe accuracy of the teacher, the unified model and the mean sub-net."""
    rows = label_budget.read_rows([fresh / f"sdr16_seed{seed}.json"])
    by_task = {r["task"]: r for r in rows}
    out = {}
    for task in domain_tasks(None):
        row = by_task[task.name]
        out[task.name] = {
            "teacher": unified_probe(runs / f"seed{seed}" / "sdr16", task, seed),
            "unified": float(row["unified_probe"]),
            "subnet_mean": float(np.mean(list(row["accuracy"].values())))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("seeds", type=int, nargs="+")
    p.add_argument("--runs", type=Path, default=Path("runs/claim_r8/runs"),
                   help="claim_runs.py's runs folder (seedS/sdr16)")
    p.add_argument("--fresh", type=Path, default=Path("runs/fresh"),
                   help="label_budget.py's outputs (sdr16_seedS.json); the result goes here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {}
    for seed in args.seeds:
        gaps = seed_gaps(seed, args.runs, args.fresh)
        result[str(seed)] = gaps
        t, m, u = (100 * np.mean([g[k] for g in gaps.values()])
                   for k in ("teacher", "subnet_mean", "unified"))
        print(f"seed {seed}: teacher {t:.1f}, sub-nets {m:.1f} ({m - t:+.1f}), "
              f"unified {u:.1f} ({u - t:+.1f})", flush=True)
    path = args.fresh / f"teacher_probe_{'_'.join(map(str, args.seeds))}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
