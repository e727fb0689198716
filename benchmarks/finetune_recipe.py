"""Fine-tune recipes vs the linear probe of the same pre-trained backbone, over seeds.

    python benchmarks/finetune_recipe.py --run-dir RUN [--task footwear-3=fashion-mnist:test@5,7,9]
        [--recipes old,new] [--seeds 3] [--limit 2000]

Loads the run's teacher (the unified backbone of a `--unified` run, or an SDR run's phase-0
teacher), splits each task 70/30 (the paper-claim split; fixed by --split-seed unless
--vary-split), and reports the frozen linear probe and each fine-tune recipe as mean ± std over
the seeds (a seed sets head initialisation, batch order and augmentation). `old` is the recipe
the bench used before (3 epochs, constant lr 0.05 on every weight, random head, BatchNorm in
train mode, no augmentation); `new` is `FineTuneConfig()`'s defaults; the other names change
one thing of `new`. Prints JSON with the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdr_edge.artifacts.run_dir import load_teacher  # noqa: E402
from sdr_edge.data.sources import load_source  # noqa: E402
from sdr_edge.models.classifier import SubnetModel  # noqa: E402
from sdr_edge.routing.evaluate import split_task  # noqa: E402
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy  # noqa: E402
from sdr_edge.training.finetune import (  # noqa: E402
    FineTuneConfig,
    evaluate_local,
    train_local,
)

NEW = FineTuneConfig()
RECIPES: dict[str, FineTuneConfig] = {
    "old": FineTuneConfig(epochs=3, lr=0.05, batch_size=64, weight_decay=5e-4,
                          schedule="constant", backbone_lr_scale=1.0, probe_init=False,
                          bn="train", augment=False),
    "new": NEW,
    "new-bn-frozen": replace(NEW, bn="frozen"),
    "new-probe-init": replace(NEW, probe_init=True),
    "new-no-augment": replace(NEW, augment=False),
    "new-backbone-lr-0.25": replace(NEW, lr=2e-3, backbone_lr_scale=0.25),
    "new-warmup": replace(NEW, warmup_fraction=0.1),
    "new-sgd": replace(NEW, optimizer="sgd", lr=0.05, backbone_lr_scale=0.1, weight_decay=5e-4),
    "new-5-epochs": replace(NEW, epochs=5),
    "new-20-epochs": replace(NEW, epochs=20),
}
DEFAULT_TASKS = ("footwear-3=fashion-mnist:test@5,7,9", "digits-10=builtin:digits")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished sdr-server train run")
    p.add_argument("--task", action="append", help="NAME=SOURCE (repeatable); default: "
                   + ", ".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=2000, help="seeded image cap per task (0: all)")
    p.add_argument("--recipes", default="old,new", help=f"comma-separated, from {list(RECIPES)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--vary-split", action="store_true", help="split with each seed too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {unknown}; choose from {list(RECIPES)}")
    return args


def stats(values: list[float]) -> dict:
    pct = [round(100 * v, 2) for v in values]
    return {"mean": round(float(np.mean(pct)), 2), "std": round(float(np.std(pct, ddof=1)), 2)
            if len(pct) > 1 else 0.0, "values": pct}


def run_task(name: str, source_spec: str, args: argparse.Namespace, recipes: list[str]) -> dict:
    backbone, spec = load_teacher(args.run_dir)
    source = load_source(source_spec, spec.image_size, spec.channels,
                         limit=args.limit or None, seed=args.split_seed)
    n_cls = int(source.labels.max()) + 1
    results: dict[str, list[float]] = {"probe": [], **{r: [] for r in recipes}}
    seconds: dict[str, float] = {r: 0.0 for r in recipes}
    for seed in range(args.seeds):
        tr, te = split_task(source, 0.3, seed if args.vary_split else args.split_seed)
        x_tr, x_te = source.images[tr], source.images[te]
        y_tr, y_te = source.labels[tr], source.labels[te]
        results["probe"].append(linear_probe_accuracy(
            extract_features(backbone, x_tr, spec), y_tr,
            extract_features(backbone, x_te, spec), y_te, seed=seed))
        for recipe in recipes:
            torch.manual_seed(seed)  # head initialisation
            model = SubnetModel(copy.deepcopy(backbone), n_cls)
            started = time.perf_counter()
            train_local(model, x_tr, y_tr, spec, replace(RECIPES[recipe], seed=seed),
                        progress=f"{name} {recipe} seed {seed}")
            seconds[recipe] += time.perf_counter() - started
            results[recipe].append(evaluate_local(model, x_te, y_te, spec).accuracy)
            print(f"{name} seed {seed} {recipe}: {results[recipe][-1]:.4f} "
                  f"(probe {results['probe'][-1]:.4f})", file=sys.stderr)
    row = {"source": source_spec, "train_images": int(len(tr)), "test_images": int(len(te)),
           **{k: stats(v) for k, v in results.items()},
           "seconds_per_run": {r: round(s / args.seeds, 1) for r, s in seconds.items()}}
    for recipe in recipes:
        row[recipe]["minus_probe"] = round(row[recipe]["mean"] - row["probe"]["mean"], 2)
    return row


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    load_start = os.getloadavg()
    tasks = {}
    for item in args.task or DEFAULT_TASKS:
        name, _, source_spec = item.partition("=")
        tasks[name] = run_task(name, source_spec or name, args, recipes)
    out = {"run_dir": str(args.run_dir), "seeds": args.seeds, "vary_split": args.vary_split,
           "limit": args.limit, "threads": args.threads,
           "recipes": {r: asdict(RECIPES[r]) for r in recipes}, "tasks": tasks,
           "loadavg_start": [round(v, 2) for v in load_start],
           "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
