"""Which label-free score re-ranks the signature's top M best? Scores and consensus variants.

    python benchmarks/label_free_scores.py --cache runs/label_budget/features \
        [--pattern 'seed[012]_sdr16_*_limitall_*.npz'] --out runs/label_free/dev.json

Reads the feature caches `label_budget.py` writes (every sub-net's features on a task's train
split, in signature order, and its linear-probe accuracy on the test split), so it trains and
extracts nothing: a device holding the train split without labels scores the signature's top M
and keeps the best. Every pick is judged like `label_budget.py` (routed − random exact over the
other sub-nets, strict regret, regret by the selection fold), over the cached (seed, task) pairs.

Two groups of options:
* single-candidate scores at M = 8: RankMe (Garrido et al. 2023) on raw and on standardised
  features, minus the alpha-ReQ power-law exponent of the eigenvalue decay (Agrawal et al.,
  NeurIPS 2022: a flatter spectrum reads as better), and each candidate's LogME against its own
  k-means clusters (k = the task's class count);
* joint scores at M = 8: the consensus score (`transferability.consensus_logme`) from one
  clustering with k = the class count, 2 × it, 16, 32 and 64; the mean of a candidate's LogME
  against every other candidate's own clusters; the mean overlap of its 10-nearest-neighbour
  sets with the other candidates'. Then one clustering at k = 32 with M = 4 and 16, on 300
  images, on all, and on all listed in another order (k-means starts elsewhere);
* the library's default consensus (9 clusterings: k = 16, 32, 64, 3 seeds each) on the
  subsample, 300 images, all, and all in another order.

Class counts are the task's, which a label-free device may not know; the library's default
does not use them. Prints a table, writes one JSON object with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_budget  # noqa: E402  (the feature cache's figures: picks, controls, intervals)

from sdr_edge.routing.transferability import (  # noqa: E402
    CONSENSUS_CLUSTERS,
    CONSENSUS_SEEDS,
    consensus_logme,
    logme,
    rankme,
    standardised,
)

Scorer = Callable[[list[np.ndarray], int], list[float]]  # (top-M features, classes) -> scores


def neg_alpha_req(f: np.ndarray) -> float:
    """Minus the slope of log singular value against log index (alpha-ReQ's exponent)."""
    s = np.linalg.svd(f - f.mean(axis=0), compute_uv=False)
    s = s[s > 1e-9]
    return float(np.polyfit(np.log(np.arange(1, len(s) + 1)), np.log(s), 1)[0])


def own_clusters(feats: list[np.ndarray], k: int) -> list[np.ndarray]:
    return [KMeans(k, n_init=3, random_state=0).fit_predict(standardised(f)) for f in feats]


def cross_logme(feats: list[np.ndarray], k: int) -> list[float]:
    labels = own_clusters(feats, k)
    return [float(np.mean([logme(standardised(f), lab) for j, lab in enumerate(labels) if j != i]))
            for i, f in enumerate(feats)]


def knn_agreement(feats: list[np.ndarray], k: int = 10) -> list[float]:
    sets = []
    for f in feats:
        f = standardised(f)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        nearest = np.argpartition(-sim, k, axis=1)[:, :k]
        member = np.zeros(sim.shape, dtype=bool)
        np.put_along_axis(member, nearest, True, axis=1)
        sets.append(member)
    return [float(np.mean([(a & b).sum() / len(a) for j, b in enumerate(sets) if j != i]))
            for i, a in enumerate(sets)]


def options() -> dict[str, tuple[int, int | None, bool, Scorer]]:
    """name -> (top M, images (None: the --subsample, 0: all), the same images in another
    order, scorer)."""
    def each(score: Callable[[np.ndarray], float]) -> Scorer:
        return lambda feats, _c: [score(f) for f in feats]

    def one_clustering(k: Callable[[int], int]) -> Scorer:
        return lambda feats, c: consensus_logme(feats, k(c), seeds=1)

    def default(feats: list[np.ndarray], _c: int) -> list[float]:
        return consensus_logme(feats)

    ks = "/".join(map(str, CONSENSUS_CLUSTERS))
    return {
        "rankme": (8, None, False, each(rankme)),
        "rankme-standardised": (8, None, False, each(lambda f: rankme(standardised(f)))),
        "alpha-req": (8, None, False, each(neg_alpha_req)),
        "own-clusters-logme": (8, None, False, lambda feats, c: [
            logme(standardised(f), lab) for f, lab in zip(feats, own_clusters(feats, c),
                                                          strict=True)]),
        "consensus-k=classes": (8, None, False, one_clustering(lambda c: c)),
        "consensus-k=2x-classes": (8, None, False, one_clustering(lambda c: 2 * c)),
        "consensus-k=16": (8, None, False, one_clustering(lambda c: 16)),
        "consensus-k=32": (8, None, False, one_clustering(lambda c: 32)),
        "consensus-k=64": (8, None, False, one_clustering(lambda c: 64)),
        "cross-clusters-logme": (8, None, False, cross_logme),
        "knn-agreement": (8, None, False, lambda feats, c: knn_agreement(feats)),
        "consensus-k=32, top 4": (4, None, False, one_clustering(lambda c: 32)),
        "consensus-k=32, top 16": (16, None, False, one_clustering(lambda c: 32)),
        "consensus-k=32, 300 images": (8, 300, False, one_clustering(lambda c: 32)),
        "consensus-k=32, all images": (8, 0, False, one_clustering(lambda c: 32)),
        "consensus-k=32, all images, another order": (8, 0, True, one_clustering(lambda c: 32)),
        f"consensus, k={ks} x {CONSENSUS_SEEDS} seeds (default)": (8, None, False, default),
        "consensus default, 300 images": (8, 300, False, default),
        "consensus default, all images": (8, 0, False, default),
        "consensus default, all images, another order": (8, 0, True, default),
    }


def evaluate(path: Path, subsample: int, only: list[str] | None = None) -> dict:
    """One cached (seed, task): every option's pick against the controls."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in ("train_features", "train_labels", "test_accuracy", "routes")}
    match = re.search(r"_(?P<task>[^_]+)_limit[^_]+_seed(?P<seed>\d+)\.npz$", path.name)
    if match is None:
        raise SystemExit(f"{path}: not a label_budget.py feature cache name")
    seed = int(match["seed"])
    acc, y = data["test_accuracy"], data["train_labels"]
    classes = len(np.unique(y))
    selected = label_budget.selection_pick(data, seed)
    order = np.random.default_rng(0).permutation(len(y))  # every option scores the same images
    row = {"cache": str(path), "task": match["task"], "seed": seed, "classes": classes,
           "signature": label_budget.pick_points(acc, 0, selected), "options": {}}
    for name, (top_m, images, reorder, scorer) in options().items():
        if only and not any(part in name for part in only):
            continue
        idx = order if images == 0 else order[:images or subsample]
        if reorder:  # the same images, listed in another order: k-means starts elsewhere
            idx = np.random.default_rng(1).permutation(idx)
        feats = [f[idx].astype(np.float64) for f in data["train_features"][:top_m]]
        t0 = time.perf_counter()
        scores = scorer(feats, classes)
        row["options"][name] = {**label_budget.pick_points(acc, int(np.argmax(scores)), selected),
                                "seconds": time.perf_counter() - t0}
    return row


def summarize(rows: list[dict]) -> dict:
    def figures(get) -> dict:
        return {k: label_budget.pair_figures(rows, lambda r, k=k: get(r)[k])
                for k in get(rows[0]) if k.endswith("_points")}

    return {"pairs": len(rows), "signature": figures(lambda r: r["signature"]),
            "options": {n: figures(lambda r, n=n: r["options"][n]) for n in rows[0]["options"]}}


def table(summary: dict) -> str:
    def line(name: str, o: dict) -> str:
        rr = o["minus_random_points"]
        seeds = " / ".join(f"{v:+.2f}" for v in rr["per_seed"])
        ci = rr["pairs"]["ci95"]
        cell = f"{rr['pairs']['mean']:+.2f}" + ("" if ci is None else f" ± {ci:.2f}")
        return (f"| {name} | {cell} | "
                f"{rr['positive_pairs']} | {o['regret_points']['pairs']['mean']:.2f} | "
                f"{label_budget.selection_regret(o)} | {seeds} |")

    lines = ["| label-free option | routed − random | pairs above random | regret | regret, "
             "selection fold (mean / worst task) | seeds |", "|---|---|---|---|---|---|",
             line("signature (top 1)", summary["signature"])]
    return "\n".join(lines + [line(n, o) for n, o in summary["options"].items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="label_budget.py's feature cache")
    p.add_argument("--pattern", default="*.npz", help="cache files to read (glob)")
    p.add_argument("--subsample", type=int, default=1500,
                   help="train images scored per task (seeded; default 1500)")
    p.add_argument("--only", action="append",
                   help="run only the options whose name contains this (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    paths = sorted(args.cache.glob(args.pattern))
    if not paths:
        p.error(f"no feature cache matches {args.cache / args.pattern}")
    t0 = time.perf_counter()
    rows = [evaluate(path, args.subsample, args.only) for path in tqdm(paths, desc="pairs")]
    summary = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv),
                                    "seconds": time.perf_counter() - t0,
                                    "load_average": os.getloadavg(), "summary": summary,
                                    "rows": rows}, indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
