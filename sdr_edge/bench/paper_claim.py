"""Does a routed sub-net beat the unified model? The paper's claim, measured end to end.

Pre-trains, on the same unlabeled pool with the same backbone and the same total epochs, the
unified SimSiam model and two SDRnets (K = 16 and K = 256). For each downstream task it
routes with the task's signature and compares, by linear-probe accuracy on frozen features and
by a few-epoch full fine-tune, the routed sub-net with the unified model and with controls from
the same SDRnet: the mean of R seeded random routes, the lowest-scored route, and the run's
phase-0 teacher. It measures the route's regret against the candidates that route-eval probes.
With `seeds` N it repeats pre-training and the task splits for N seeds and reports every number
as mean, std and 95 % t-interval; differences are paired within a seed, and the verdict is
judged on the intervals, not on one draw. Writes results.json (per-seed rows and the
aggregate), results.md and a report with plots; rerunning the same command reuses finished runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.artifacts.run_dir import load_sdrnet, load_teacher
from sdr_edge.bench.budgets import BUDGETS, Budget, TaskSpec, tasks, train_config_dict
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.data.sources import load_source
from sdr_edge.errors import SdrEdgeError
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.resnet import Backbone
from sdr_edge.routing.evaluate import evaluate_routing, plot_routing, split_task
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.finetune import FineTuneConfig, evaluate_local, train_local
from sdr_edge.training.pipeline import train

log = logging.getLogger(__name__)
TEST_FRACTION = 0.3
MODELS = ("unified", "sdr16", "sdr256")
SDR_MODELS = ("sdr16", "sdr256")


class BenchError(SdrEdgeError, ValueError):
    """A bench option, budget or stored seed evaluation does not fit (one line)."""


def run_root(out: Path, seed: int) -> Path:
    """Where one seed's pre-training runs live: every seed is a separate, reusable set of runs."""
    return out / "runs" / f"seed{seed}"


PRETRAIN_RUNS = ("unified", "sdr16", "sdr256")


def pretrain_all(budget: Budget, out: Path, seed: int, kd_weight: float | None = None,
                 only: tuple[str, ...] = PRETRAIN_RUNS) -> dict[str, Path]:
    """The three pre-training runs of one seed (resumable; finished ones are reused), or the
    `only` ones of them. `kd_weight` changes only the SDR runs: the unified run has no teacher,
    so its config stays the budget's."""
    if unknown := sorted(set(only) - set(PRETRAIN_RUNS)):
        raise BenchError(f"unknown pre-training run(s) {unknown} ({', '.join(PRETRAIN_RUNS)})")
    sdr = replace(budget, kd_weight=budget.kd_weight if kd_weight is None else kd_weight)
    runs = {
        "unified": (config_from_dict(train_config_dict(budget, (4, 4, 4, 4),
                                                       budget.level_epochs_k256, seed)), True),
        "sdr16": (config_from_dict(train_config_dict(sdr, (4, 4), sdr.level_epochs_k16,
                                                     seed)), False),
        "sdr256": (config_from_dict(train_config_dict(sdr, (4, 4, 4, 4),
                                                      sdr.level_epochs_k256, seed)), False),
    }
    root = run_root(out, seed)
    paths = {}
    for name, (cfg, unified) in runs.items():
        if name not in only:
            continue
        if cfg.total_epochs != budget.total_epochs:
            raise BenchError(f"{name}: {cfg.total_epochs} total epochs != {budget.total_epochs}")
        t0 = time.perf_counter()
        result = train(cfg, root / name, unified=unified)
        log.info("pre-training %s seed %d: %s in %.0f s", name, seed,
                 "reused" if result.already_done else "trained", time.perf_counter() - t0)
        paths[name] = root / name
    return paths


def seed_result_path(out: Path, seed: int) -> Path:
    """One seed's evaluated rows: a rerun (or a parallel run of other seeds) reuses them."""
    return run_root(out, seed) / "evaluation.json"


def _cached_seed(out: Path, key: dict) -> dict | None:
    """The stored evaluation of a seed when it was made with the same budget and tasks."""
    path = seed_result_path(out, key["seed"])
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): evaluating seed %d again", path, exc, key["seed"])
        return None
    if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key)):
        return None
    return stored.get("result")


def finetune_accuracy(backbone: Backbone, spec: InputSpec, x_tr: np.ndarray, y_tr: np.ndarray,
                      x_te: np.ndarray, y_te: np.ndarray, num_classes: int, budget: Budget,
                      seed: int) -> float:
    """Full fine-tuning (backbone + linear head) with the library's recipe; test accuracy."""
    torch.manual_seed(seed)  # the head's initialisation: same seed, same number
    model = SubnetModel(copy.deepcopy(backbone), num_classes)
    cfg = FineTuneConfig(epochs=budget.finetune_epochs, lr=budget.finetune_lr, mode="full",
                         seed=seed)
    train_local(model, x_tr, y_tr, spec, cfg, progress="fine-tune")
    return evaluate_local(model, x_te, y_te, spec).accuracy


def task_split(task: TaskSpec, spec: InputSpec, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A task's seeded image cap and train/test split, as every model of the bench sees it:
    (x_train, y_train, x_test, y_test)."""
    source = load_source(task.source, spec.image_size, spec.channels, limit=task.limit, seed=seed)
    tr, te = split_task(source, TEST_FRACTION, seed)
    return source.images[tr], source.labels[tr], source.images[te], source.labels[te]


def probe_on(model: Backbone, spec: InputSpec, split: tuple[np.ndarray, ...], seed: int) -> float:
    """Linear-probe accuracy of frozen `model` on a `task_split`."""
    x_tr, y_tr, x_te, y_te = split
    return linear_probe_accuracy(extract_features(model, x_tr, spec), y_tr,
                                 extract_features(model, x_te, spec), y_te, seed=seed)


def unified_probe(unified_run: Path, task: TaskSpec, seed: int) -> float:
    """The unified model's linear-probe accuracy on one task split."""
    model, spec = load_teacher(unified_run)
    return probe_on(model, spec, task_split(task, spec, seed), seed)


def evaluate_task(task: TaskSpec, runs: dict[str, Path], budget: Budget, out: Path,
                  seed: int, plots: bool = True) -> dict:
    """One seed's numbers on one task: unified, and per SDRnet (K = 16, 256) the routed sub-net
    beside its controls (the run's phase-0 teacher, R random routes, the lowest-scored route)."""
    unified, spec = load_teacher(runs["unified"])
    split = task_split(task, spec, seed)
    x_tr, y_tr, x_te, y_te = split
    n_cls = int(max(y_tr.max(), y_te.max())) + 1
    row: dict = {"task": task.name, "source": task.source, "seed": seed, "train_images": len(x_tr),
                 "test_images": len(x_te), "classes": n_cls}
    u_probe = probe_on(unified, spec, split, seed)
    u_ft = finetune_accuracy(unified, spec, x_tr, y_tr, x_te, y_te, n_cls, budget, seed)
    row["unified"] = {"probe": u_probe, "finetune": u_ft,
                      "finetune_minus_probe_points": 100.0 * (u_ft - u_probe)}
    for name, candidates in (("sdr16", budget.candidates_k16), ("sdr256", budget.candidates_k256)):
        result = evaluate_routing(runs[name], task.source, candidates, image_limit=task.limit,
                                  test_fraction=TEST_FRACTION, seed=seed,
                                  random_routes=budget.random_routes)
        if plots:
            plot_routing(result, out / "report" / f"route_{task.name}_{name}.png",
                         unified_probe_accuracy=u_probe)
        net, sdr_spec = load_sdrnet(runs[name])
        routed = net.extract(result["routed_route"]).eval()
        probe = result["routed_probe_accuracy"]
        ft = finetune_accuracy(routed, sdr_spec, x_tr, y_tr, x_te, y_te, n_cls, budget, seed)
        teacher = result.get("teacher_probe_accuracy")
        row[name] = {
            "route": result["routed_route"],
            "score_rank": result["routed_score_rank"],
            "probe": probe,
            "finetune": ft,
            "teacher_probe": teacher,
            "random_routes": result.get("random_routes", []),
            "random_probes": result.get("random_probe_accuracies", []),
            "random_probe": result.get("random_probe_accuracy"),
            "lowest_route": result.get("lowest_route"),
            "lowest_probe": result.get("lowest_probe_accuracy"),
            "lowest_score_rank": result.get("lowest_score_rank"),
            "num_subnets": result["num_subnets"],
            "best_route": result["best_route"],
            "best_probe": result["best_probe_accuracy"],
            "regret_points": result["regret_points"],
            "selected_regret_points": result["selected_regret_points"],
            "routed_minus_unified_points": 100.0 * (probe - u_probe),
            "routed_minus_random_points": result.get("routed_minus_random_points"),
            "routed_minus_teacher_points": None if teacher is None else 100.0 * (probe - teacher),
            "finetune_minus_probe_points": 100.0 * (ft - probe),
            "candidates": result["candidates_mode"],
            "num_candidates": result["num_candidates"],
            "spearman": result["spearman_score_vs_probe"],
        }
        rr = row[name]["routed_minus_random_points"]
        log.info("%s seed %d %s: route %s probe %.3f (unified %.3f, random %s) regret %.2f pts",
                 task.name, seed, name, result["routed_route"], probe, u_probe,
                 "n/a" if rr is None else f"{rr:+.2f} pts", row[name]["regret_points"])
    return row


# ----- statistics over seeds ----------------------------------------------------------------

def interval(values: list[float | None], level: float = 0.95) -> dict:
    """Mean, sample std and the two-sided Student-t interval of the mean over seeds.

    Missing values (None) are left out; with fewer than two values std and interval are None
    (one draw says nothing about its noise)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = int(v.size)
    stats_: dict = {"n": n, "mean": float(v.mean()) if n else None, "std": None, "ci95": None,
                    "lo": None, "hi": None}
    if n >= 2:
        std = float(v.std(ddof=1))
        half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))
        stats_.update(std=std, ci95=half, lo=stats_["mean"] - half, hi=stats_["mean"] + half)
    return stats_


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric_fields(entries: list[dict]) -> list[str]:
    """Keys whose values are numbers (or missing) in every entry, first-seen order."""
    keys = list(dict.fromkeys(k for e in entries for k in e))
    return [k for k in keys
            if all(e.get(k) is None or _is_number(e.get(k)) for e in entries)
            and any(_is_number(e.get(k)) for e in entries)]


def with_selection_ceiling(entry: dict) -> dict:
    """The entry with `selected_minus_random_points`: the sub-net that the task's own labels
    pick on a selection fold, minus the mean of the random routes, on the test split.

    It is what a route choice could gain on this SDRnet. Unlike the best test score (the max of
    many noisy scores, biased upward), the selection fold does not look at the test split, so
    it is a fair ceiling for routed − random. Derived from two stored numbers, so evaluations
    written before it existed get it too."""
    rr, sel = entry.get("routed_minus_random_points"), entry.get("selected_regret_points")
    if rr is None or sel is None or "selected_minus_random_points" in entry:
        return entry
    return {**entry, "selected_minus_random_points": rr + sel}


def aggregate(per_seed: list[list[dict]]) -> dict:
    """Every number of every task and model as mean/std/95 % interval over seeds.

    Differences (routed − unified, routed − random, …) are computed within a seed first and only
    then aggregated: a paired comparison, so noise shared by both sides of a seed cancels.
    `mean_over_tasks` averages each number over the tasks within a seed, then over seeds."""
    if not per_seed:
        raise BenchError("no seeds to aggregate")
    names = [r["task"] for r in per_seed[0]]
    for rows in per_seed[1:]:
        if [r["task"] for r in rows] != names:
            raise BenchError("every seed must evaluate the same tasks in the same order")
    per_seed = [[{**r, **{m: with_selection_ceiling(r[m]) for m in MODELS if m != "unified"}}
                 for r in rows] for rows in per_seed]
    out: dict = {"seeds": [rows[0]["seed"] for rows in per_seed], "task_names": names,
                 "tasks": {}, "mean_over_tasks": {}}
    for i, name in enumerate(names):
        out["tasks"][name] = {}
        for model in MODELS:
            entries = [rows[i][model] for rows in per_seed]
            out["tasks"][name][model] = {k: interval([e.get(k) for e in entries])
                                         for k in _numeric_fields(entries)}
    for model in MODELS:
        entries = [r[model] for rows in per_seed for r in rows]
        fields: dict = {}
        for k in _numeric_fields(entries):
            per = []
            for rows in per_seed:
                vals = [r[model].get(k) for r in rows]
                per.append(None if any(v is None for v in vals) else float(np.mean(vals)))
            fields[k] = interval(per)
        out["mean_over_tasks"][model] = fields
    return out


def verdict(agg: dict, model: str = "sdr256", min_gain_points: float = 1.0,
            max_regret_points: float = 1.0, max_finetune_std_points: float = 1.5) -> dict:
    """The claims, judged on the seed statistics rather than one draw.

    * routed − random (mean over tasks) ≥ `min_gain_points` with its 95 % interval above 0;
    * routed ≥ unified on ≥ 3 of 4 tasks (¾ of them; per-task means) and on average;
    * regret against the candidate a selection fold picks ≤ `max_regret_points` on every task;
    * fine-tune ≥ linear probe on every task, fine-tune std over seeds ≤ the given points.
    """
    tasks_ = agg["tasks"]
    names = agg["task_names"]
    mot = agg["mean_over_tasks"][model]
    per = {t: tasks_[t][model] for t in names}

    def mean(stats_: dict | None) -> float | None:
        return None if stats_ is None else stats_["mean"]

    rr = mot.get("routed_minus_random_points") or interval([])
    rr_holds = bool(rr["lo"] is not None and rr["mean"] >= min_gain_points and rr["lo"] > 0)
    ru = mot["routed_minus_unified_points"]
    wins = sum(mean(per[t]["routed_minus_unified_points"]) >= 0 for t in names)
    need = math.ceil(0.75 * len(names))  # 3 of 4 tasks, 5 of 6
    ru_holds = bool(wins >= need and ru["mean"] >= 0)
    sel = {t: mean(per[t]["selected_regret_points"]) for t in names}
    strict = {t: mean(per[t]["regret_points"]) for t in names}
    gap = {t: mean(per[t]["finetune_minus_probe_points"]) for t in names}
    ft_std = {t: None if per[t]["finetune"]["std"] is None else 100.0 * per[t]["finetune"]["std"]
              for t in names}
    ft_holds = bool(all(g >= 0 for g in gap.values())
                    and all(s is not None and s <= max_finetune_std_points
                            for s in ft_std.values()))
    claims = {
        "routed_vs_random": {"points": rr, "min_gain_points": min_gain_points,
                             "holds": rr_holds},
        "routed_vs_unified": {"points": ru, "tasks_won": int(wins), "tasks": len(names),
                              "tasks_needed": need,
                              "per_task_points": {t: per[t]["routed_minus_unified_points"]
                                                  for t in names},
                              "holds": ru_holds},
        "selection_regret": {"per_task_points": sel, "max_points": max(sel.values()),
                             "limit_points": max_regret_points,
                             "holds": bool(max(sel.values()) <= max_regret_points)},
        "finetune_vs_probe": {"gap_points": gap, "finetune_std_points": ft_std,
                              "max_std_points": max_finetune_std_points, "holds": ft_holds},
    }
    return {
        "model": model, "metric": "probe", "seeds": len(agg["seeds"]),
        "tasks_won": int(wins), "tasks": len(names),
        "mean_routed": mot["probe"]["mean"], "mean_unified":
            agg["mean_over_tasks"]["unified"]["probe"]["mean"],
        "mean_routed_minus_random_points": rr["mean"],
        "max_regret_points": max(strict.values()),
        "max_selected_regret_points": max(sel.values()),
        "selected_minus_random_points": mot.get("selected_minus_random_points"),
        "claims": claims,
        "holds": all(c["holds"] for c in claims.values()),
    }


# ----- tables and plots -----------------------------------------------------------------------

def fmt(stats_: dict | None, scale: float = 1.0, signed: bool = False) -> str:
    """'mean ± CI half-width' (just the mean for one seed, 'n/a' when missing)."""
    if stats_ is None or stats_["mean"] is None:
        return "n/a"
    m = f"{scale * stats_['mean']:{'+' if signed else ''}.1f}"
    return m if stats_["ci95"] is None else f"{m} ± {scale * stats_['ci95']:.1f}"


TABLE_COLUMNS = ("unified", "teacher (phase 0)", "random (mean of R)", "lowest-scored", "routed",
                 "routed − unified", "routed − random", "regret, selection fold",
                 "fine-tune routed", "fine-tune unified")


def table_rows(agg: dict, model: str) -> list[list[str]]:
    """One row per task plus the mean over tasks, in the order of TABLE_COLUMNS."""
    out = []
    for label, entry in [*((t, agg["tasks"][t]) for t in agg["task_names"]),
                         ("mean over tasks", agg["mean_over_tasks"])]:
        u, m = entry["unified"], entry[model]
        out.append([label, fmt(u["probe"], 100), fmt(m.get("teacher_probe"), 100),
                    fmt(m.get("random_probe"), 100), fmt(m.get("lowest_probe"), 100),
                    fmt(m["probe"], 100), fmt(m["routed_minus_unified_points"], signed=True),
                    fmt(m.get("routed_minus_random_points"), signed=True),
                    fmt(m["selected_regret_points"]), fmt(m["finetune"], 100),
                    fmt(u["finetune"], 100)])
    return out


def _claim_lines(v: dict) -> list[str]:
    c = v["claims"]
    yes = {True: "holds", False: "does not hold"}
    return [
        f"- routed − random (mean over tasks): {fmt(c['routed_vs_random']['points'], signed=True)}"
        f" pts, needs ≥ +{c['routed_vs_random']['min_gain_points']:.1f} with the interval above"
        f" 0: {yes[c['routed_vs_random']['holds']]}",
        f"- routed ≥ unified on {c['routed_vs_unified']['tasks_won']}/"
        f"{c['routed_vs_unified']['tasks']} tasks, mean "
        f"{fmt(c['routed_vs_unified']['points'], signed=True)} pts: "
        f"{yes[c['routed_vs_unified']['holds']]}",
        f"- regret, selection fold: max {c['selection_regret']['max_points']:.2f} pts (limit "
        f"{c['selection_regret']['limit_points']:.1f}): {yes[c['selection_regret']['holds']]}",
        "- ceiling: the sub-net the task's labels pick on the selection fold − random: "
        f"{fmt(v.get('selected_minus_random_points'), signed=True)} pts (what a route choice "
        "could gain on these sub-nets)",
        "- fine-tune − probe (min over tasks) "
        f"{min(c['finetune_vs_probe']['gap_points'].values()):+.1f} pts, fine-tune std over "
        "seeds (max) " + (
            "n/a" if None in c["finetune_vs_probe"]["finetune_std_points"].values() else
            f"{max(c['finetune_vs_probe']['finetune_std_points'].values()):.1f}")
        + f" pts (limit {c['finetune_vs_probe']['max_std_points']:.1f}): "
        f"{yes[c['finetune_vs_probe']['holds']]}",
    ]


def markdown_table(agg: dict, model: str = "sdr256") -> str:
    """The multi-seed table of one SDRnet: accuracies (%) and differences (points)."""
    head = ("| task | " + " | ".join(TABLE_COLUMNS) + " |\n"
            + "|---" * (len(TABLE_COLUMNS) + 1) + "|\n")
    return head + "\n".join("| " + " | ".join(r) + " |" for r in table_rows(agg, model)) + "\n"


def markdown_report(summary: dict) -> str:
    agg, b = summary["aggregate"], summary["budget"]
    seeds = agg["seeds"]
    parts = [f"Command: `{summary['command']}` (budget `{b['name']}`, pool `{b['pool']}`, task set "
             f"`{b['task_set']}`, seeds {', '.join(map(str, seeds))}, R = {b['random_routes']} "
             f"random routes, {summary['seconds'] / 60:.1f} min)\n",
             f"Test accuracy (%) and differences (points) as mean ± 95 % t-interval half-width "
             f"over {len(seeds)} seed(s); each seed re-runs pre-training and the task splits, "
             "and differences are paired within a seed. Teacher (phase 0) is the SDR run's own "
             "phase-0 model; unified is a separate run with the same total epochs.\n"]
    for model, title in (("sdr256", "K = 256"), ("sdr16", "K = 16")):
        parts += [f"### {title}\n", markdown_table(agg, model),
                  "\n".join(_claim_lines(summary["verdicts"][model])) + "\n"]
    return "\n".join(parts)


def _bars(ax, groups: list[str], series: list[tuple[str, list[float | None], list[float | None]]],
          ylabel: str, title: str) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, means, halves) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width,
               [np.nan if m is None else m for m in means], width, label=label,
               yerr=[0.0 if h is None else h for h in halves], capsize=2)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot_accuracies(agg: dict, path: Path, model: str = "sdr256") -> Path:
    """Probe accuracy of every model and control, the paired differences and fine-tune vs probe,
    each with its 95 % interval over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = agg["task_names"]
    entries = [agg["tasks"][t] for t in names] + [agg["mean_over_tasks"]]
    groups = [*names, "mean"]

    def series(mdl: str, key: str, scale: float) -> tuple[list, list]:
        st = [e[mdl].get(key) or interval([]) for e in entries]
        return ([None if s["mean"] is None else scale * s["mean"] for s in st],
                [None if s["ci95"] is None else scale * s["ci95"] for s in st])

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=110)
    k = "K=256" if model == "sdr256" else "K=16"
    _bars(axes[0], groups, [
        ("unified (own run)", *series("unified", "probe", 100)),
        ("teacher (phase 0)", *series(model, "teacher_probe", 100)),
        ("random routes (mean)", *series(model, "random_probe", 100)),
        ("lowest-scored route", *series(model, "lowest_probe", 100)),
        (f"routed {k}", *series(model, "probe", 100)),
    ], "linear probe accuracy (%)", f"linear probe, {k} (95 % interval over seeds)")
    lo = [m for m in series("unified", "probe", 100)[0] + series(model, "lowest_probe", 100)[0]
          if m is not None]
    axes[0].set_ylim(max(0.0, min(lo) - 25) if lo else 0.0, 100)
    _bars(axes[1], groups, [
        ("routed − unified, K=256", *series("sdr256", "routed_minus_unified_points", 1)),
        ("routed − random, K=256", *series("sdr256", "routed_minus_random_points", 1)),
        ("routed − unified, K=16", *series("sdr16", "routed_minus_unified_points", 1)),
        ("routed − random, K=16", *series("sdr16", "routed_minus_random_points", 1)),
    ], "difference (points)", "paired differences per seed")
    axes[1].axhline(0, color="black", lw=0.8)
    _bars(axes[2], groups, [
        ("unified probe", *series("unified", "probe", 100)),
        ("unified fine-tune", *series("unified", "finetune", 100)),
        (f"routed {k} probe", *series(model, "probe", 100)),
        (f"routed {k} fine-tune", *series(model, "finetune", 100)),
    ], "test accuracy (%)", "fine-tune vs linear probe")
    axes[2].set_ylim(0, 100)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict) -> None:
    from sdr_edge.report.html import Section, update_index

    report = out / "report"
    agg = summary["aggregate"]
    plot_accuracies(agg, report / "accuracy.png")
    table = [["task", *TABLE_COLUMNS], *table_rows(agg, "sdr256")]
    v = summary["verdicts"]["sdr256"]
    text = (f"Command: {summary['command']} — budget {summary['budget']['name']}, "
            f"{len(agg['seeds'])} seed(s), {summary['seconds'] / 60:.1f} min. K = 256, linear "
            "probe, mean ± 95 % interval: " + " ".join(_claim_lines(v)).replace("- ", "")
            + f" Overall: {'holds' if v['holds'] else 'does not hold'}.")
    routes = [f"route_{t}_{m}.png" for t in agg["task_names"] for m in ("sdr16", "sdr256")]
    update_index(report, [Section("Paper claim: routed sub-net vs unified model and controls",
                                  ["accuracy.png"], text, table, key="paper-claim"),
                          Section(f"Routing score vs probe accuracy per task (seed "
                                  f"{agg['seeds'][0]})", routes, key="paper-claim-routes")],
                 title="sdr-edge paper claim")


def _domains():
    """sdr_edge.bench.domains (the mixed pool and its tasks), or one clear error."""
    try:
        from sdr_edge.bench import domains
    except ImportError as exc:
        raise BenchError(f"the mixed-domain pool needs sdr_edge.bench.domains ({exc})") from exc
    return domains


def resolve_budget(budget_name: str, *, task_limit: int | None = None, pool: str | None = None,
                   task_set: str | None = None, pool_limit: int | None = None,
                   random_routes: int | None = None) -> Budget:
    """The named budget with the command's overrides, checked before any pre-training."""
    if budget_name not in BUDGETS:
        raise BenchError(f"unknown budget {budget_name!r} ({', '.join(BUDGETS)})")
    for flag, value in (("--task-limit", task_limit), ("--pool-limit", pool_limit)):
        if value is not None and value < 0:
            raise BenchError(f"{flag} must be >= 0 (0: all images), got {value}")
    budget = BUDGETS[budget_name]
    if task_limit is not None:
        budget = replace(budget, task_limit=task_limit or None)
    if pool is not None:
        budget = replace(budget, pool=pool)
    if task_set is not None:
        budget = replace(budget, task_set=task_set)
        if task_set == "domains" and pool is None:
            budget = replace(budget, pool=_domains().MIXED_POOL)
    if pool_limit is not None:
        budget = replace(budget, pool_limit=pool_limit or None)
    if random_routes is not None:
        if random_routes < 0:
            raise BenchError(f"--random-routes must be >= 0, got {random_routes}")
        budget = replace(budget, random_routes=random_routes)
    task_list = tasks(budget)  # fails before hours of pre-training when the task set is missing
    sources = [budget.pool] + [t.source for t in task_list]
    if any("glyphs:" in src for src in sources):  # missing fonts: one line, before training
        _domains().check_fonts(sources)
    return budget


def run(budget_name: str, out: str | Path, seed: int = 0, argv: list[str] | None = None,
        task_limit: int | None = None, kd_weight: float | None = None, seeds: int = 1,
        pool: str | None = None, task_set: str | None = None,
        random_routes: int | None = None, pool_limit: int | None = None) -> dict:
    """The whole benchmark over seeds `seed, …, seed + seeds − 1` (each re-runs pre-training
    and the task splits). `task_limit` overrides the budget's images per task (0: all),
    `kd_weight` the SDR runs' SiamKD weight, `pool`/`pool_limit` (0: all)/`task_set`/
    `random_routes` the budget's. Task set "domains" pre-trains on the mixed pool of
    sdr_edge.bench.domains unless `pool` says otherwise."""
    if seeds < 1:
        raise BenchError(f"--seeds must be at least 1, got {seeds}")
    budget = resolve_budget(budget_name, task_limit=task_limit, pool=pool, task_set=task_set,
                            pool_limit=pool_limit, random_routes=random_routes)
    task_list = tasks(budget)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = []
    for i, s in enumerate(range(seed, seed + seeds)):
        runs = pretrain_all(budget, out, s, kd_weight)
        key = {"budget": budget.to_dict(), "kd_weight": kd_weight, "seed": s,
               "tasks": [t.name for t in task_list]}
        cached = _cached_seed(out, key)
        if cached is not None:
            log.info("seed %d: reusing its evaluation (%s)", s, seed_result_path(out, s))
            per_seed.append(cached)
            continue
        if budget.threads > 0:  # training restores torch's default; small evals want the budget's
            torch.set_num_threads(budget.threads)
        ts = time.perf_counter()
        rows = [evaluate_task(task, runs, budget, out, s, plots=i == 0) for task in task_list]
        log.info("seed %d evaluated in %.0f s", s, time.perf_counter() - ts)
        per_seed.append({"seed": s, "runs": {k: str(v) for k, v in runs.items()}, "tasks": rows})
        atomic_write_text(seed_result_path(out, s),
                          json.dumps({"key": key, "result": per_seed[-1]}, indent=1) + "\n")
    agg = aggregate([p["tasks"] for p in per_seed])
    verdicts = {m: verdict(agg, m) for m in SDR_MODELS}
    summary = {
        "command": " ".join(shlex.quote(a) for a in (argv or sys.argv)),
        "budget": budget.to_dict(),
        "sdr_kd_weight": budget.kd_weight if kd_weight is None else kd_weight,
        "seeds": agg["seeds"],
        "seconds": time.perf_counter() - t0,
        "per_seed": per_seed,
        "aggregate": agg,
        "verdict": verdicts["sdr256"],
        "verdicts": verdicts,
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown_report(summary))
    write_report(out, summary)
    return summary
