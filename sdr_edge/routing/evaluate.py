"""How much the cheap signature route loses: probe candidate sub-nets on a labelled task.

`evaluate_routing` splits a labelled task (seeded, stratified), computes the task's signature
with the run's kit on the train split, routes it, and scores candidate sub-nets (all K, or the
top M by routing score) with a linear probe and kNN on frozen features. It reports the regret
of the routed sub-net (best candidate probe accuracy minus the routed one, in points; also
with the best candidate picked on a selection fold of the train split, which removes the
upward bias of taking the maximum of many noisy test scores) and the
Spearman rank correlation between routing score and probe accuracy. Controls put the routed
sub-net in context: R seeded random routes (distinct, never the routed one), the lowest-scored
route, and the run's phase-0 teacher (the model SiamKD distils toward; it is *not* the unified
baseline, which is a separate run). `sdr-server route-eval` and the paper-claim benchmark are
thin wrappers around it.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from sdr_edge.artifacts.run_dir import KIT_DIR, load_sdrnet, load_teacher
from sdr_edge.data.sources import ImageSource, load_source
from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.kit_runtime import KitRunner, compute_signature
from sdr_edge.routing.probe import extract_features, knn_probe_accuracy, linear_probe_accuracy
from sdr_edge.routing.signature import Route, all_routes, route_signature, score_routes

log = logging.getLogger(__name__)


class RouteEvalError(SdrEdgeError, ValueError):
    """A route-eval option or task does not fit (one line for the user)."""


def parse_candidates(text: str | int | None) -> int | None:
    """'all' (or None) -> None; 'topM' / 'M' / M -> M (>= 1)."""
    if text is None or text == "all":
        return None
    if isinstance(text, int):
        m = text
    else:
        match = re.fullmatch(r"(?:top)?(\d+)", str(text).strip())
        if not match:
            raise RouteEvalError(f"--candidates must be 'all' or 'topM' (e.g. top8), got {text!r}")
        m = int(match.group(1))
    if m < 1:
        raise RouteEvalError("--candidates topM needs M >= 1")
    return m


def split_task(source: ImageSource, test_fraction: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified train/test indices; a clear error when the task cannot be split."""
    if source.labels is None:
        raise RouteEvalError(f"task {source.name!r} has no labels (use a folder with one "
                             "sub-folder per class, builtin:digits or fashion-mnist)")
    return split_labels(source.labels, test_fraction, seed, f"task {source.name!r}")


def split_labels(labels: np.ndarray, test_fraction: float, seed: int, what: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`split_task` on the labels alone (`what` names them in the error)."""
    if not 0.0 < test_fraction < 1.0:
        raise RouteEvalError(f"test fraction must be in (0, 1), got {test_fraction}")
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    if stratify is None:
        log.warning("some class has a single image: splitting without stratification")
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                       stratify=stratify)
    except ValueError as exc:
        raise RouteEvalError(f"cannot split {what} ({len(labels)} images): {exc}") from exc
    return np.sort(train), np.sort(test)


SELECTION_FRACTION = 0.25


def selection_fold(train_labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, selection) indices into a task's train split: the fold on which the task's own
    labels pick the "best" candidate without looking at the test split (the max of many noisy
    test scores is biased upward: the winner's curse)."""
    return split_labels(train_labels, SELECTION_FRACTION, seed + 1, "the train split")


def selection_accuracy(train_features: np.ndarray, train_labels: np.ndarray, seed: int) -> float:
    """One candidate's linear-probe accuracy on the selection fold, fitted on the rest."""
    fit, sel = selection_fold(train_labels, seed)
    return linear_probe_accuracy(train_features[fit], train_labels[fit], train_features[sel],
                                 train_labels[sel], seed=seed)


def _nan_to_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def random_control_routes(branching: tuple[int, ...], routed: Route, count: int, seed: int
                          ) -> list[Route]:
    """`count` distinct routes drawn uniformly (seeded) from all routes except the routed one.

    Drawn from the lexicographic route list, so the draw does not depend on the routing scores.
    Fewer come back when the SDRnet has fewer than `count` other sub-nets."""
    if count < 0:
        raise RouteEvalError(f"random routes must be >= 0, got {count}")
    pool = [r for r in all_routes(branching) if r != tuple(routed)]
    if count > len(pool):
        log.warning("only %d routes besides the routed one: using all of them as random controls",
                    len(pool))
        count = len(pool)
    rng = np.random.default_rng([seed, 0x5D7])
    return [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))]


def evaluate_routing(run_dir: str | Path, task_source: str, candidates: str | int | None = "all",
                     *, image_limit: int | None = None, test_fraction: float = 0.3,
                     seed: int = 0, batch_size: int = 256, knn_k: int = 20,
                     include_teacher: bool = True, random_routes: int = 0,
                     progress: bool = True) -> dict:
    """Route a labelled task with the kit and probe candidate sub-nets; see the module docstring.

    `random_routes` R > 0 also probes R random routes and the lowest-scored route (controls:
    they are not candidates, so they do not change the regret)."""
    run_dir = Path(run_dir)
    top_m = parse_candidates(candidates)
    if random_routes < 0:
        raise RouteEvalError(f"random routes must be >= 0, got {random_routes}")
    net, spec = load_sdrnet(run_dir)
    runner = KitRunner(run_dir / KIT_DIR)
    if (runner.spec.image_size, runner.spec.channels) != (spec.image_size, spec.channels):
        raise RouteEvalError(f"kit input {runner.spec.image_size}px x {runner.spec.channels} "
                             f"does not match the SDRnet's {spec.image_size}px x "
                             f"{spec.channels}")
    if runner.branching != net.branching:
        raise RouteEvalError(f"kit branching {runner.branching} != SDRnet branching "
                             f"{net.branching}")
    source = load_source(task_source, spec.image_size, spec.channels, limit=image_limit, seed=seed)
    train_idx, test_idx = split_task(source, test_fraction, seed)
    x_tr, x_te = source.images[train_idx], source.images[test_idx]
    y_tr, y_te = source.labels[train_idx], source.labels[test_idx]

    sig = compute_signature(runner, x_tr, batch_size=batch_size)
    routed = route_signature(sig)
    scored = score_routes(sig)
    score_of = dict(scored)
    rank_of = {route: i + 1 for i, (route, _) in enumerate(scored)}
    chosen: list[Route] = [r for r, _ in scored] if top_m is None else \
        [r for r, _ in scored[:top_m]]
    if routed not in chosen:
        chosen.append(routed)

    randoms = random_control_routes(net.branching, routed, random_routes, seed) \
        if random_routes else []
    lowest = scored[-1][0]
    controls = [*randoms, lowest] if random_routes else []
    probed: dict[Route, dict] = {}
    todo = chosen + [r for r in dict.fromkeys(controls) if r not in chosen]
    for route in tqdm(todo, desc="route-eval sub-nets", disable=not progress, leave=False):
        backbone = net.extract(route).eval()
        f_tr = extract_features(backbone, x_tr, spec, batch_size)
        f_te = extract_features(backbone, x_te, spec, batch_size)
        probed[route] = {
            "route": list(route),
            "score": score_of[route],
            "score_rank": rank_of[route],
            "probe_accuracy": linear_probe_accuracy(f_tr, y_tr, f_te, y_te, seed=seed),
            "selection_accuracy": selection_accuracy(f_tr, y_tr, seed),
            "knn_accuracy": knn_probe_accuracy(f_tr, y_tr, f_te, y_te, k=knn_k),
            "routed": route == routed,
        }
    rows = [probed[r] for r in chosen]
    routed_row = next(r for r in rows if r["routed"])
    best_row = max(rows, key=lambda r: (r["probe_accuracy"], -r["score_rank"]))
    best_knn = max(rows, key=lambda r: (r["knn_accuracy"], -r["score_rank"]))
    selected = max(rows, key=lambda r: (r["selection_accuracy"], -r["score_rank"]))
    rho, pvalue = (float("nan"), float("nan"))
    if len(rows) >= 3:
        res = spearmanr([r["score"] for r in rows], [r["probe_accuracy"] for r in rows])
        rho, pvalue = float(res.statistic), float(res.pvalue)
    result = {
        "run": str(run_dir),
        "task": task_source,
        "train_images": int(len(train_idx)),
        "test_images": int(len(test_idx)),
        "num_classes": int(len(np.unique(source.labels))),
        "skipped_files": len(source.skipped),
        "candidates_mode": "all" if top_m is None else f"top{top_m}",
        "num_candidates": len(rows),
        "num_subnets": net.num_subnets,
        "signature": sig.to_dict(),
        "routed_route": list(routed),
        "routed_probe_accuracy": routed_row["probe_accuracy"],
        "routed_knn_accuracy": routed_row["knn_accuracy"],
        "best_route": best_row["route"],
        "best_probe_accuracy": best_row["probe_accuracy"],
        "regret_points": 100.0 * (best_row["probe_accuracy"] - routed_row["probe_accuracy"]),
        "selected_route": selected["route"],
        "selected_probe_accuracy": selected["probe_accuracy"],
        "selected_regret_points": 100.0 * (selected["probe_accuracy"]
                                           - routed_row["probe_accuracy"]),
        "best_knn_route": best_knn["route"],
        "knn_regret_points": 100.0 * (best_knn["knn_accuracy"] - routed_row["knn_accuracy"]),
        "routed_rank_by_probe": 1 + sum(r["probe_accuracy"] > routed_row["probe_accuracy"]
                                        for r in rows),
        "spearman_score_vs_probe": _nan_to_none(rho),
        "spearman_pvalue": _nan_to_none(pvalue),
        "candidates": sorted(rows, key=lambda r: r["score_rank"]),
        "routed_score_rank": routed_row["score_rank"],
    }
    if random_routes:
        random_acc = [probed[r]["probe_accuracy"] for r in randoms]
        mean_random = float(np.mean(random_acc)) if random_acc else None
        result.update({
            "random_routes": [list(r) for r in randoms],
            "random_probe_accuracies": random_acc,
            "random_probe_accuracy": mean_random,
            "routed_minus_random_points": None if mean_random is None else
            100.0 * (routed_row["probe_accuracy"] - mean_random),
            "lowest_route": list(lowest),
            "lowest_score_rank": rank_of[lowest],
            "lowest_probe_accuracy": probed[lowest]["probe_accuracy"],
            "controls": [{**probed[r], "control": "random"} for r in randoms]
            + [{**probed[lowest], "control": "lowest"}],
        })
    if include_teacher:
        teacher, _ = load_teacher(run_dir)
        f_tr = extract_features(teacher, x_tr, spec, batch_size)
        f_te = extract_features(teacher, x_te, spec, batch_size)
        result["teacher_probe_accuracy"] = linear_probe_accuracy(f_tr, y_tr, f_te, y_te, seed=seed)
        result["teacher_knn_accuracy"] = knn_probe_accuracy(f_tr, y_tr, f_te, y_te, k=knn_k)
    return result


def plot_routing(result: dict, path: str | Path, unified_probe_accuracy: float | None = None
                 ) -> Path:
    """Routing score vs probe accuracy for every candidate, routed and best highlighted.

    Each reference is labelled for what it is: the run's own phase-0 teacher, the random and
    lowest-scored controls, and (when given) the unified baseline, a separate pre-training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter([r["score"] for r in rows], [100 * r["probe_accuracy"] for r in rows], s=14,
               color="tab:blue", alpha=0.7, label="candidate sub-nets")
    best = next(r for r in rows if r["route"] == result["best_route"])
    ax.scatter([best["score"]], [100 * best["probe_accuracy"]], s=90, facecolors="none",
               edgecolors="tab:green", linewidths=2, label=f"best {tuple(best['route'])}")
    routed = next(r for r in rows if r["routed"])
    ax.scatter([routed["score"]], [100 * routed["probe_accuracy"]], s=140, marker="*",
               color="tab:red", label=f"routed {tuple(routed['route'])}")
    controls = result.get("controls") or []
    rand = [r for r in controls if r["control"] == "random"]
    if rand:
        ax.scatter([r["score"] for r in rand], [100 * r["probe_accuracy"] for r in rand], s=36,
                   marker="x", color="tab:orange", label=f"random routes ({len(rand)})")
    for r in controls:
        if r["control"] == "lowest":
            ax.scatter([r["score"]], [100 * r["probe_accuracy"]], s=60, marker="v",
                       color="tab:purple", label=f"lowest-scored {tuple(r['route'])}")
    if result.get("teacher_probe_accuracy") is not None:
        ax.axhline(100 * result["teacher_probe_accuracy"], color="gray", ls="--", lw=1,
                   label="teacher (phase 0)")
    if unified_probe_accuracy is not None:
        ax.axhline(100 * unified_probe_accuracy, color="black", ls=":", lw=1,
                   label="unified (own run)")
    rho = result.get("spearman_score_vs_probe")
    ax.set_title(f"{result['task']}: regret {result['regret_points']:.2f} pts, "
                 f"Spearman {'n/a' if rho is None else f'{rho:.2f}'}", fontsize=10)
    ax.set_xlabel("routing score (sum of log mean digit probabilities)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
