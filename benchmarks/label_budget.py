"""How many labels must a device hold for its route choice to pay? Label picks among the top M.

    python benchmarks/label_budget.py --run runs/claim_r8/runs/seed0/sdr16 --seed 0 \
        [--unified runs/claim_r8/runs/seed0/unified] [--run ... --seed 1 ...] [--limit 0] \
        [--budgets 5,10,25,50,100] [--top-m 2,4,8,16] --out runs/label_budget/seed0.json
    python benchmarks/label_budget.py --merge runs/label_budget/seed*.json --out runs/label_budget/all.json

The signature (kit only, label-free) ranks every sub-net of a small SDRnet; a device holding n
labelled images per class may download the top M and keep the one a transferability score
rates best on those n (`sdr_edge.routing.transferability`: LogME, leave-one-out kNN, or the
cross-validated linear probe); a device without labels may re-rank the top M on its whole
train split by RankMe or the consensus score (rows with 0 labels per class). Every sub-net is
probed on the task's test split (all of them: the script needs K <= 64), so routed − random
is exact (the mean over the other sub-nets) and every (score, n, M) is judged by the same
yardstick as the claim table (with `--unified`, one per --run, also against the unified model
on the same split). Each n is drawn `--draws` times (nested: the n = 10 images contain the
n = 5 ones); a pair's figure is the mean over its draws, and the intervals are over (run, task)
pairs. Features of every sub-net are
cached (`--cache`, npz, our own files) so a rerun only re-scores. Prints a table and writes one
JSON object (with the load average and the device cost: bytes downloaded and seconds of
extraction + scoring) and a plot of routed − random against the label budget beside it (.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdr_edge.artifacts.run_dir import KIT_DIR, load_sdrnet
from sdr_edge.bench.budgets import TaskSpec
from sdr_edge.bench.domains import domain_tasks
from sdr_edge.bench.paper_claim import interval, task_split, unified_probe
from sdr_edge.routing.evaluate import selection_accuracy
from sdr_edge.routing.kit_runtime import KitRunner, compute_signature
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy
from sdr_edge.routing.rerank_eval import few_labels, weights_nbytes
from sdr_edge.routing.route_ids import format_route_id
from sdr_edge.routing.signature import score_routes
from sdr_edge.routing.transferability import (
    LABEL_FREE_METHODS,
    LABELLED_METHODS,
    score_candidates,
    score_features,
)

CACHE_VERSION = 1
CACHE_FIELDS = ("version", "run_sha256", "routes", "train_features", "train_labels",
                "test_accuracy", "extract_seconds_per_image", "bundle_bytes", "test_images")


def run_sha256(run: Path) -> str:
    """The run's manifest digest (it lists every file's sha256): a retrained run is a new key."""
    return hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()


def read_cache(path: Path, run_digest: str) -> dict | None:
    """A cached entry of this script for this run, or None (missing, stale, or unreadable:
    then it is recomputed and rewritten, and an unreadable one is reported)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in CACHE_FIELDS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        print(f"{path}: unreadable feature cache, recomputed ({exc})", file=sys.stderr)
        return None
    fresh = int(data["version"]) == CACHE_VERSION and str(data["run_sha256"]) == run_digest
    return data if fresh else None


def subnet_features(run: Path, task, seed: int, cache: Path) -> dict:
    """Signature order, every sub-net's train/test features and test probe accuracy (cached
    per run, task, image limit and split seed)."""
    limit = task.limit or "all"
    path = cache / f"{run.parent.name}_{run.name}_{task.name}_limit{limit}_seed{seed}.npz"
    digest = run_sha256(run)
    if (cached := read_cache(path, digest)) is not None:
        return cached
    net, spec = load_sdrnet(run)
    x_tr, y_tr, x_te, y_te = task_split(task, spec, seed)
    signature = compute_signature(KitRunner(run / KIT_DIR), x_tr)
    order = [route for route, _ in score_routes(signature)]
    f_tr, acc, extract_s = [], [], 0.0
    for route in tqdm(order, desc=f"{task.name} sub-nets", leave=False):
        backbone = net.extract(route).eval()
        t0 = time.perf_counter()
        f_tr.append(extract_features(backbone, x_tr, spec))
        extract_s += time.perf_counter() - t0
        acc.append(linear_probe_accuracy(f_tr[-1], y_tr, extract_features(backbone, x_te, spec),
                                         y_te, seed=seed))
    bundle_bytes = weights_nbytes(net.extract(order[0]))
    data = {"version": np.int64(CACHE_VERSION), "run_sha256": np.str_(digest),
            "routes": np.asarray(order, dtype=np.int64),
            "train_features": np.stack(f_tr), "train_labels": y_tr, "test_accuracy": np.asarray(acc),
            "extract_seconds_per_image": np.float64(extract_s / (len(order) * len(x_tr))),
            "bundle_bytes": np.int64(bundle_bytes), "test_images": np.int64(len(y_te))}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data


def score_draws(data: dict, budgets: list[int], draws: int, seed: int) -> dict:
    """scores[method][n] -> draws x K array of every sub-net's score (signature order), and the
    seconds each (method, n) took to score one sub-net."""
    f, y = data["train_features"], data["train_labels"]
    scores = {m: {n: np.zeros((draws, len(f))) for n in budgets} for m in LABELLED_METHODS}
    seconds = {m: {n: 0.0 for n in budgets} for m in LABELLED_METHODS}
    for d in range(draws):
        for n in budgets:
            labelled = few_labels(y, n, seed * 1000 + d)
            for m in LABELLED_METHODS:
                t0 = time.perf_counter()
                scores[m][n][d] = [score_features(m, fk[labelled], y[labelled]) for fk in f]
                seconds[m][n] += (time.perf_counter() - t0) / (draws * len(f))
    return {"scores": scores, "seconds": seconds}


def label_free_scores(data: dict, top_ms: list[int]) -> dict:
    """scores[method][M] -> the signature's top M scored without labels on the whole train
    split (the device's unlabelled images; the consensus score depends on which candidates
    are scored together, so it is computed per M), and the seconds per sub-net."""
    f = data["train_features"]
    scores: dict = {m: {} for m in LABEL_FREE_METHODS}
    seconds: dict = {m: {} for m in LABEL_FREE_METHODS}
    for m in LABEL_FREE_METHODS:
        for top_m in top_ms:
            if top_m > len(f):
                continue
            t0 = time.perf_counter()
            scores[m][top_m] = np.asarray(score_candidates(m, list(f[:top_m])))
            seconds[m][top_m] = (time.perf_counter() - t0) / top_m
    return {"scores": scores, "seconds": seconds}


def selection_pick(data: dict, seed: int) -> int:
    """The sub-net the task's own labels pick on the claim table's selection fold (25 % of the
    train split, `routing.evaluate.selection_fold`; ties: the better signature rank). It is the
    yardstick of the issue's regret target; unlike the best on the test set, it does not look
    at the test split."""
    f, y = data["train_features"], data["train_labels"]
    return int(np.argmax([selection_accuracy(fk, y, seed) for fk in f]))


def pick_points(acc: np.ndarray, pick: int, selected: int) -> dict[str, float]:
    """Sub-net `pick` against the controls, in points: minus the mean of the other sub-nets
    (a random route), regret (the best on the test set minus it), regret by the selection fold
    (the `selected` sub-net minus it, on the test set: negative when the pick is better), and
    its own probe accuracy."""
    return {"minus_random_points": 100.0 * (acc[pick] - np.delete(acc, pick).mean()),
            "regret_points": 100.0 * (acc.max() - acc[pick]),
            "selection_regret_points": 100.0 * (acc[selected] - acc[pick]),
            "probe_points": 100.0 * acc[pick]}


def mean_points(figures: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}


def pick_figures(acc: np.ndarray, scores: np.ndarray, top_m: int, selected: int
                 ) -> dict[str, float]:
    """`pick_points` averaged over draws; each draw's pick is the best-scored of the
    signature's top M (ties: the better signature rank)."""
    # argmax keeps the first, i.e. better-routed, on ties
    return mean_points([pick_points(acc, int(np.argmax(r[:top_m])), selected)
                        for r in np.atleast_2d(scores)])


def figures_row(acc: np.ndarray, scores: np.ndarray, top_m: int, selected: int,
                unified: float | None) -> dict:
    row = pick_figures(acc, scores, top_m, selected)
    if unified is not None:
        row["minus_unified_points"] = row["probe_points"] - 100.0 * unified
    return row


def evaluate(run: Path, task, seed: int, budgets: list[int], top_ms: list[int], draws: int,
             cache: Path, unified: Path | None = None) -> dict:
    data = subnet_features(run, task, seed, cache)
    acc = data["test_accuracy"]
    k = len(acc)
    scored = score_draws(data, budgets, draws, seed)
    selected = selection_pick(data, seed)
    unified_acc = None if unified is None else unified_probe(unified, task, seed)
    row = {"run": str(run), "task": task.name, "seed": seed, "num_subnets": k,
           "test_images": int(data["test_images"]), "train_images": int(len(data["train_labels"])),
           "classes": int(len(np.unique(data["train_labels"]))),
           "bundle_bytes": int(data["bundle_bytes"]),
           "extract_seconds_per_image": float(data["extract_seconds_per_image"]),
           "unified_probe": unified_acc,
           "selected_route": format_route_id(data["routes"][selected]),
           "signature": figures_row(acc, np.zeros(k), 1, selected, unified_acc),
           "accuracy": {format_route_id(r): float(a)
                        for r, a in zip(data["routes"], acc, strict=True)},
           "options": {}}
    for m in LABELLED_METHODS:
        for n in budgets:
            for top_m in top_ms:
                if top_m > k:
                    continue
                row["options"][f"{m}/{n}/{top_m}"] = {
                    **figures_row(acc, scored["scores"][m][n], top_m, selected, unified_acc),
                    "score_seconds_per_subnet": scored["seconds"][m][n]}
    free = label_free_scores(data, top_ms)
    for m in LABEL_FREE_METHODS:
        for top_m, scores in free["scores"][m].items():
            row["options"][f"{m}/0/{top_m}"] = {
                **figures_row(acc, scores, top_m, selected, unified_acc),
                "score_seconds_per_subnet": free["seconds"][m][top_m]}
    return row


def device_cost(rows: list[dict], n: int, top_m: int, method: str) -> dict:
    """Mean over tasks of what a device pays for one (method, n, M): M bundles, extraction of
    its n x classes labelled images (n = 0: label-free, every train image) by M sub-nets, M
    scores."""
    bytes_, secs = [], []
    for r in rows:
        labelled = min(n * r["classes"], r["train_images"]) if n else r["train_images"]
        bytes_.append(top_m * r["bundle_bytes"])
        secs.append(top_m * (labelled * r["extract_seconds_per_image"]
                             + r["options"][f"{method}/{n}/{top_m}"]["score_seconds_per_subnet"]))
    return {"bytes": float(np.mean(bytes_)), "device_seconds": float(np.mean(secs))}


def pair_figures(rows: list[dict], get: Callable[[dict], float]) -> dict:
    """One figure over the (seed, task) pairs: its interval over the pairs and over the seeds'
    task means, the seeds' means, each task's mean over seeds (the claim table's per-task
    figure), and how many pairs are above 0."""
    seeds = sorted({r["seed"] for r in rows})
    per_seed = [float(np.mean([get(r) for r in rows if r["seed"] == s])) for s in seeds]
    tasks = dict.fromkeys(r["task"] for r in rows)
    per_task = {t: float(np.mean([get(r) for r in rows if r["task"] == t])) for t in tasks}
    values = [float(get(r)) for r in rows]
    return {"pairs": interval(values), "seeds": interval(per_seed), "per_seed": per_seed,
            "per_task": per_task, "positive_pairs": sum(v > 0 for v in values)}


def summarize(rows: list[dict]) -> dict:
    def all_figures(get) -> dict:
        names = [m for m in get(rows[0]) if m.endswith("_points")]
        return {m: pair_figures(rows, lambda r, m=m: get(r)[m]) for m in names}

    out = {"signature": all_figures(lambda r: r["signature"]), "options": {}}
    for key in rows[0]["options"]:
        method, n, top_m = key.split("/")
        out["options"][key] = {**all_figures(lambda r, k=key: r["options"][k]),
                               **device_cost(rows, int(n), int(top_m), method)}
    return out


def table(summary: dict) -> str:
    """Markdown: one line per option, routed − random and regret over the pairs."""
    def cell(fig: dict | None) -> str:
        if fig is None:
            return ""
        p = fig["pairs"]
        return f"{p['mean']:+.2f} ± {p['ci95']:.2f}" if p["ci95"] is not None else f"{p['mean']:+.2f}"

    def line(name: str, n: str, top_m: str, o: dict, cost: str) -> str:
        unified = o.get("minus_unified_points")
        above = f"{unified['positive_pairs']}" if unified else ""
        return (f"| {name} | {n} | {top_m} | {o['probe_points']['pairs']['mean']:.1f} | "
                f"{cell(o['minus_random_points'])} | {o['minus_random_points']['positive_pairs']} | "
                f"{cell(unified)} | {above} | {o['regret_points']['pairs']['mean']:.2f} | "
                f"{selection_regret(o)} | {cost} |")

    lines = ["| score | labels per class | top M | routed | routed − random | pairs above random | "
             "routed − unified | pairs above unified | regret | regret, selection fold "
             "(mean / worst task) | bytes, device s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             line("signature", "0", "1", summary["signature"], "")]
    for key, o in summary["options"].items():
        method, n, top_m = key.split("/")
        lines.append(line(method, n, top_m, o,
                          f"{o['bytes'] / 1e6:.1f} MB, {o['device_seconds']:.2f} s"))
    return "\n".join(lines)


def selection_regret(o: dict) -> str:
    """Regret by the selection fold over the pairs and for the worst task (its mean over
    seeds: what the issue's "≤ 1 point on every task" is judged on), or "" in outputs from
    before it was measured."""
    fig = o.get("selection_regret_points")
    if fig is None:
        return ""
    return f"{fig['pairs']['mean']:+.2f} / {max(fig['per_task'].values()):+.2f}"


def plot(summary: dict, path: Path, top_m: int) -> Path:
    """Routed − random against labels per class, one line per score at one top M, with the
    95 % interval over pairs, beside the label-free signature route and the +1 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    all_budgets: set[int] = set()
    for i, (method, color) in enumerate(zip(LABELLED_METHODS, ("tab:blue", "tab:orange",
                                                               "tab:green"), strict=True)):
        keys = [k for k in summary["options"] if k.startswith(f"{method}/")
                and k.endswith(f"/{top_m}")]
        budgets = [int(k.split("/")[1]) for k in keys]
        pairs = [summary["options"][k]["minus_random_points"]["pairs"] for k in keys]
        all_budgets.update(budgets)
        shifted = [b * (1 + 0.05 * (i - 1)) for b in budgets]  # side by side, not on top
        ax.errorbar(shifted, [f["mean"] for f in pairs], yerr=[f["ci95"] or 0 for f in pairs],
                    marker="o", capsize=3, color=color, label=f"{method}, top {top_m}")
    sig = summary["signature"]["minus_random_points"]["pairs"]
    ax.axhspan(sig["lo"] if sig["lo"] is not None else sig["mean"],
               sig["hi"] if sig["hi"] is not None else sig["mean"], color="tab:red", alpha=0.12)
    ax.axhline(sig["mean"], color="tab:red", label="signature route (label-free)")
    for method, color in zip(LABEL_FREE_METHODS, ("tab:purple", "tab:brown"), strict=True):
        if (free := summary["options"].get(f"{method}/0/{top_m}")) is not None:
            ax.axhline(free["minus_random_points"]["pairs"]["mean"], color=color, linestyle=":",
                       label=f"{method}, top {top_m} (label-free)")
    ax.axhline(1.0, color="grey", linestyle="--", label="target +1")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_budgets), [str(b) for b in sorted(all_budgets)])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class on the device")
    ax.set_ylabel("routed − random (points, 95 % interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_rows(paths: list[Path], script: str = "label_budget.py") -> list[dict]:
    """The rows of several outputs of `script`, or one line naming the file that is not one."""
    rows = []
    for path in paths:
        try:
            rows += json.loads(path.read_text(encoding="utf-8"))["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not an output of {script} ({exc})") from exc
    return rows


def write_merged(out: Path, paths: list[Path], summary: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "merged": [str(p) for p in paths],
                               "summary": summary, "rows": rows}, indent=1) + "\n")


def merge(paths: list[Path], out: Path) -> int:
    """One summary over the rows of several outputs of this script."""
    rows = read_rows(paths)
    summary = summarize(rows)
    write_merged(out, paths, summary, rows)
    print(table(summary))
    plot(summary, out.with_suffix(".png"), plot_top_m(summary))
    return 0


def plot_top_m(summary: dict) -> int:
    """The client's default of 8 candidates when measured, else the largest M measured."""
    measured = {int(k.split("/")[2]) for k in summary["options"]}
    return 8 if 8 in measured else max(measured)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def run_parser(description: str) -> argparse.ArgumentParser:
    """The options every per-sub-net bench on these runs shares: runs, seeds, unified baselines,
    task size, threads, feature cache, output and --merge."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--run", action="append", type=Path, help="SDRnet run dir (K <= 64)")
    p.add_argument("--merge", nargs="+", type=Path,
                   help="summarise the rows of earlier outputs (seeds run as parallel processes)")
    p.add_argument("--seed", action="append", type=int, help="task split seed of each --run")
    p.add_argument("--unified", action="append", type=Path,
                   help="the unified run of each --run (same pool and seed), as a baseline")
    p.add_argument("--limit", type=int, default=0, help="images per task (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, help="feature cache folder (default: beside --out)")
    p.add_argument("--out", type=Path, required=True)
    return p


def parse_run_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if not args.merge and not args.run:
        p.error("give --run (or --merge)")
    return args


def main(argv: list[str] | None = None) -> int:
    p = run_parser(__doc__.split("\n")[0])
    p.add_argument("--budgets", type=int_list, default=[5, 10, 25, 50, 100],
                   help="labelled images per class (default 5,10,25,50,100)")
    p.add_argument("--top-m", type=int_list, default=[2, 4, 8, 16], help="candidates downloaded")
    p.add_argument("--draws", type=int, default=3, help="label draws per budget")
    args = parse_run_args(p, argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.draws < 1:
        p.error("--draws must be >= 1")
    t0 = time.perf_counter()
    rows = []
    for run, seed, unified_run, task, _ in each_pair(p, args):
        rows.append(evaluate(run, task, seed, args.budgets, args.top_m, args.draws,
                             args.cache or args.out.parent / "features", unified_run))
        print(task.name, seed, round(rows[-1]["signature"]["minus_random_points"], 2),
              {k: round(v["minus_random_points"], 2) for k, v in rows[-1]["options"].items()
               if k.endswith(f"/{max(args.top_m)}")}, file=sys.stderr)
    summary = summarize(rows)
    write_result(args.out, t0, summary, rows)
    print(table(summary))
    plot(summary, args.out.with_suffix(".png"), plot_top_m(summary))
    return 0


def each_pair(p: argparse.ArgumentParser, args: argparse.Namespace
              ) -> Iterator[tuple[Path, int, Path | None, TaskSpec, int]]:
    """(run, seed, unified run, task, sub-nets) for every --run and task, the arguments checked
    first (one --seed and one --unified, or none, per --run; at most 64 sub-nets)."""
    seeds = args.seed or list(range(len(args.run)))
    unified = args.unified or [None] * len(args.run)
    if len(seeds) != len(args.run) or len(unified) != len(args.run):
        p.error("give one --seed (and one --unified, or none) per --run")
    torch.set_num_threads(args.threads)
    for run, seed, unified_run in zip(args.run, seeds, unified, strict=True):
        net, _ = load_sdrnet(run)
        if net.num_subnets > 64:
            p.error(f"{run}: {net.num_subnets} sub-nets; every one is probed, so at most 64")
        for task in domain_tasks(args.limit or None):
            yield run, seed, unified_run, task, net.num_subnets


def write_result(out: Path, t0: float, summary: dict, rows: list[dict]) -> None:
    """The JSON output, with the wall time and the load average (benchmarks run alone)."""
    result = {"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
              "load_average": os.getloadavg(), "summary": summary, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"seconds": result["seconds"], "load_average": result["load_average"]}))


if __name__ == "__main__":
    raise SystemExit(main())
