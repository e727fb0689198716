"""Compare two stored recipe evaluations of `sdr-server bench --recipes`, paired per seed and task.

Why: the bench's recipes.md gives each recipe's mean over seeds, but two recipes trained on the
same phase-0 teacher differ far less than seeds do, so the fair comparison pairs them within a
seed (and within a task, 6 tasks x seeds pairs). Reads OUT/runs/seedS/recipe_NAME.json, which the
bench writes, and prints JSON: per recipe routed, routed - random, routed - unified and the
tasks where routed >= unified; then A - B paired over seeds and over (seed, task) pairs.

    python benchmarks/recipe_pairs.py --out runs/round8 --seeds 0 1 2 --a deep2+tree --b deep2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sdr_edge.bench.paper_claim import interval


def load(out: Path, name: str, seed: int) -> dict:
    path = out / "runs" / f"seed{seed}" / f"recipe_{name}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored["result"]
    except FileNotFoundError:
        raise SystemExit(f"recipe_pairs: no stored evaluation {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"recipe_pairs: {path} is not a recipe evaluation ({exc})") from None


def per_task(ev: dict, metric: str, scale: float = 1.0) -> dict[str, float]:
    return {t["task"]: scale * t[metric] for t in ev["tasks"] if t[metric] is not None}


def describe(evals: list[dict]) -> dict:
    routed = [per_task(e, "routed", 100) for e in evals]
    rr = [per_task(e, "routed_minus_random") for e in evals]
    ru = [per_task(e, "routed_minus_unified") for e in evals]
    return {
        "routed": interval([float(np.mean(list(r.values()))) for r in routed]),
        "routed_minus_random": interval([float(np.mean(list(r.values()))) for r in rr]),
        "routed_minus_random_pairs": interval([v for r in rr for v in r.values()]),
        "routed_minus_unified": interval([float(np.mean(list(r.values()))) for r in ru]),
        "routed_minus_unified_pairs": interval([v for r in ru for v in r.values()]),
        "tasks_routed_ge_unified_mean": sum(
            float(np.mean([r[t] for r in ru])) >= 0 for t in ru[0]),
        "tasks": len(ru[0]),
        "expert_spread": [float(np.mean([e["expert_spread"][i] for e in evals]))
                          for i in range(min(len(e["expert_spread"]) for e in evals))],
        "domain_purity": interval([e.get("domain_purity") for e in evals]),
    }


def paired(a: list[dict], b: list[dict], metric: str, scale: float) -> dict:
    seeds, pairs = [], []
    for ea, eb in zip(a, b, strict=True):
        ta, tb = per_task(ea, metric, scale), per_task(eb, metric, scale)
        common = [t for t in ta if t in tb]
        diffs = [ta[t] - tb[t] for t in common]
        seeds.append(float(np.mean(diffs)))
        pairs += diffs
    return {"per_seed": seeds, "over_seeds": interval(seeds), "over_pairs": interval(pairs),
            "pairs_above": sum(d > 0 for d in pairs), "pairs": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the recipe bench's output folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--a", required=True, help="recipe name (recipe_A.json)")
    ap.add_argument("--b", required=True, help="the recipe A is paired against")
    args = ap.parse_args(argv)
    a = [load(args.out, args.a, s) for s in args.seeds]
    b = [load(args.out, args.b, s) for s in args.seeds]
    result = {"command": " ".join(sys.argv), "seeds": args.seeds,
              args.a: describe(a), args.b: describe(b),
              f"{args.a} - {args.b}": {
                  "routed": paired(a, b, "routed", 100),
                  "routed_minus_random": paired(a, b, "routed_minus_random", 1)}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
