"""Score candidate sub-nets on a labelled task and report the regret of the signature's route.

Writes OUT/route_eval.json (routed and best route, accuracies, regret in points, Spearman
correlation between routing score and linear-probe accuracy, a per-candidate table, and the
controls: R random routes, the lowest-scored route, the run's phase-0 teacher) and
OUT/route_eval.png (score vs probe accuracy, the routed sub-net highlighted).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdr_edge.cli import CommandError

RESULT_JSON = "route_eval.json"
RESULT_PNG = "route_eval.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory of sdr-server train")
    parser.add_argument("--task", required=True,
                        help="labelled task: builtin:digits, fashion-mnist[:train|:test] or a "
                             "folder with one sub-folder per class")
    parser.add_argument("--candidates", default="all",
                        help="'all' sub-nets, or 'topM' by routing score (the routed one is "
                             "always included)")
    parser.add_argument("--random-routes", type=int, default=8, metavar="R",
                        help="also probe R seeded random routes and the lowest-scored route as "
                             "controls (0: none; default 8)")
    parser.add_argument("--image-limit", type=int, default=None,
                        help="use a seeded random subset of this many task images")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", required=True, type=Path, help="output folder")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.artifacts.atomic import atomic_write_text
    from sdr_edge.artifacts.run_dir import RunDirError
    from sdr_edge.routing.evaluate import evaluate_routing, parse_candidates, plot_routing
    from sdr_edge.routing.kit_runtime import KitError

    if not args.run.is_dir():
        raise CommandError(f"run directory not found: {args.run}")
    if args.image_limit is not None and args.image_limit < 4:
        raise CommandError("--image-limit must be at least 4")
    if args.random_routes < 0:
        raise CommandError("--random-routes must be >= 0")
    try:
        parse_candidates(args.candidates)
        result = evaluate_routing(args.run, args.task, args.candidates,
                                  image_limit=args.image_limit, test_fraction=args.test_fraction,
                                  seed=args.seed, batch_size=args.batch_size, knn_k=args.knn_k,
                                  random_routes=args.random_routes)
    except (RunDirError, KitError) as exc:
        raise CommandError(str(exc)) from exc
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / RESULT_JSON, json.dumps(result, indent=2) + "\n")
    plot_routing(result, args.out / RESULT_PNG)
    summary = {k: result[k] for k in (
        "task", "routed_route", "routed_probe_accuracy", "best_route", "best_probe_accuracy",
        "regret_points", "spearman_score_vs_probe", "num_candidates")}
    if args.random_routes:
        summary["random_probe_accuracy"] = result["random_probe_accuracy"]
        summary["routed_minus_random_points"] = result["routed_minus_random_points"]
    summary["json"], summary["plot"] = str(args.out / RESULT_JSON), str(args.out / RESULT_PNG)
    print(json.dumps(summary))
    return 0
