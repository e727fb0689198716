"""Retrain one SDR recipe on a stored teacher under a new name, and compare it paired per seed.

Why: a recipe result is only worth keeping if it survives a change of implementation. Issue 10's
round 5 found that deep2's +0.6 points over random routes (trained by an older branch) fell to
-0.3 when the same recipe was retrained by today's code on the same phase-0 teachers. This script
does that check for any recipe of `sdr-server bench --recipes`: it trains `RECIPE` into
`OUT/runs/seedS/NAME` with the current code, borrowing `OUT/runs/seedS/base`'s teacher, evaluates
it as the bench does (`recipe_NAME.json` beside the others), then prints per-seed and paired
figures against the stored recipe evaluations it is given with `--against`.

    python benchmarks/recipe_rerun.py --out runs/recipes_nozg --recipe deep2 --name deep2-main \
        --seeds 0 1 2 --task-set domains --pool-limit 12000 --task-limit 0 --against deep2 base
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.bench.budgets import Budget, tasks
from sdr_edge.bench.paper_claim import fmt, interval, resolve_budget, unified_probe
from sdr_edge.bench.recipes import evaluate_recipe, recipe_config, train_locked


def record_key(recipe: str, seed: int, budget: Budget) -> dict:
    """What a stored rerun was made for (as JSON reads it back): reused only when it matches."""
    return json.loads(json.dumps({"recipe": recipe, "seed": seed, "budget": budget.to_dict()}))


def rerun(out: Path, recipe: str, name: str, seed: int, budget: Budget) -> dict:
    key = record_key(recipe, seed, budget)
    root = out / "runs" / f"seed{seed}"
    if not (root / "base" / "teacher.safetensors").is_file():
        raise SystemExit(f"recipe_rerun: {root / 'base'} has no teacher; run the bench first")
    path = root / f"recipe_{name}.json"
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") != key:
            raise SystemExit(f"recipe_rerun: {path} was made for another recipe, seed or budget; "
                             "choose another --name")
        return stored["result"]
    run = train_locked(recipe_config(budget, recipe, seed, root / "base"), root / name)
    if budget.threads > 0:
        torch.set_num_threads(budget.threads)
    unified = {t.name: unified_probe(root / "unified", t, seed) for t in tasks(budget)}
    result = {"recipe": recipe, "name": name, "seed": seed,
              **evaluate_recipe(run, unified, budget, seed)}
    atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=1) + "\n")
    return result


#: What decides which images a recipe evaluation probes and against how many random routes: a
#: stored evaluation is comparable with this rerun only when these budget fields agree (the
#: fine-tune fields do not enter a recipe evaluation, which probes only).
EVALUATION_FIELDS = ("pool", "pool_limit", "image_size", "task_set", "task_limit",
                     "random_routes")


def comparable_result(path: Path, budget: Budget) -> dict:
    """The result stored at `path`, refused in one line when it was evaluated on other tasks.

    Why: runs/recipes_nozg keeps 2,000-image evaluations beside whole-task-set reruns under the
    same recipe names, and pairing the two mixes test sets (a +1.9 that was really -3.5)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"recipe_rerun: no stored evaluation {path}") from None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"recipe_rerun: {path} is not a readable evaluation ({exc})") from None
    key = stored.get("key") if isinstance(stored, dict) else None
    theirs = key.get("budget") if isinstance(key, dict) else None
    if not isinstance(theirs, dict) or "result" not in stored:
        raise SystemExit(f"recipe_rerun: {path} has no key.budget or no result, so its tasks "
                         "are unknown; compare only with bench or recipe_rerun records")
    ours = record_key("", 0, budget)["budget"]  # as a stored record reads it back
    for name in EVALUATION_FIELDS:
        if theirs.get(name) != ours.get(name):
            raise SystemExit(f"recipe_rerun: {path} was evaluated with {name} = "
                             f"{theirs.get(name)!r}, this rerun with {ours.get(name)!r}; compare "
                             "evaluations of the same tasks")
    return stored["result"]


def task_mean(evaluation: dict, metric: str) -> float:
    return float(np.mean([t[metric] for t in evaluation["tasks"] if t[metric] is not None]))


def summary(name: str, evals: list[dict], against: dict[str, list[dict]]) -> dict:
    """Per recipe: routed, routed − random and routed − unified over seeds; paired differences of
    `name` against every stored recipe."""
    def row(ev: list[dict]) -> dict:
        return {"routed": interval([100 * task_mean(e, "routed") for e in ev]),
                "routed_minus_random": interval([task_mean(e, "routed_minus_random") for e in ev]),
                "routed_minus_unified": interval([task_mean(e, "routed_minus_unified")
                                                  for e in ev])}
    out = {"recipes": {name: row(evals), **{n: row(ev) for n, ev in against.items()}},
           "paired": {}}
    for ref, ev in against.items():
        out["paired"][ref] = {
            "routed": interval([100 * (task_mean(a, "routed") - task_mean(b, "routed"))
                                for a, b in zip(evals, ev, strict=True)]),
            "routed_minus_random": interval([task_mean(a, "routed_minus_random")
                                             - task_mean(b, "routed_minus_random")
                                             for a, b in zip(evals, ev, strict=True)])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the recipe bench's output folder")
    ap.add_argument("--recipe", required=True, help="a recipe of sdr-server bench --recipes")
    ap.add_argument("--name", required=True, help="folder and record name of the rerun")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--against", nargs="*", default=[],
                    help="stored recipes (recipe_NAME.json) to compare with, paired per seed")
    ap.add_argument("--task-set", default="domains")
    ap.add_argument("--pool-limit", type=int)
    ap.add_argument("--task-limit", type=int)
    args = ap.parse_args(argv)
    if args.name in {"base", *args.against} or "/" in args.name:
        raise SystemExit(f"recipe_rerun: --name {args.name!r} would overwrite a stored record")
    options = {"task_set": args.task_set, "pool_limit": args.pool_limit,
               "task_limit": args.task_limit, "pool": None, "random_routes": None}
    budget = resolve_budget("cpu", **options)
    # checked before training: a rerun takes minutes, a wrong --against should not
    against = {ref: [comparable_result(args.out / "runs" / f"seed{s}" / f"recipe_{ref}.json",
                                       budget) for s in args.seeds]
               for ref in args.against}
    evals = [rerun(args.out, args.recipe, args.name, s, budget) for s in args.seeds]
    result = {"command": " ".join(sys.argv), "load_average": list(os.getloadavg()),
              "seeds": args.seeds, **summary(args.name, evals, against)}
    print(json.dumps(result, indent=2))
    for ref, d in result["paired"].items():
        print(f"{args.name} - {ref}, paired: routed {fmt(d['routed'], signed=True)} pts, "
              f"routed - random {fmt(d['routed_minus_random'], signed=True)} pts",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
