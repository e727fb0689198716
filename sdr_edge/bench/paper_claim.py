"""Does a routed sub-net beat the unified model? The paper's claim, measured end to end.

Pre-trains, on the same unlabeled pool with the same backbone and the same total epochs, the
unified SimSiam model and two SDRnets (K = 16 and K = 256). For each downstream task it
routes with the task's signature, then compares the routed sub-net with the unified model by
linear-probe accuracy on frozen features and by a few-epoch full fine-tune, and measures the
route's regret against the candidates that route-eval probes. Writes results.json,
results.md and a report with plots; rerunning the same command reuses finished runs.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.artifacts.run_dir import load_sdrnet, load_teacher
from sdr_edge.bench.budgets import BUDGETS, Budget, TaskSpec, tasks, train_config_dict
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.data.sources import load_source
from sdr_edge.federated.local import LocalTrainConfig, evaluate_local, train_local
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.resnet import Backbone
from sdr_edge.routing.evaluate import evaluate_routing, plot_routing, split_task
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.pipeline import train

log = logging.getLogger(__name__)
TEST_FRACTION = 0.3
MODELS = ("unified", "sdr16", "sdr256")


def pretrain_all(budget: Budget, out: Path, seed: int, kd_weight: float | None = None
                 ) -> dict[str, Path]:
    """The three pre-training runs (resumable; finished ones are reused). `kd_weight` changes
    only the SDR runs: the unified run has no teacher, so its config stays the budget's."""
    sdr = replace(budget, kd_weight=budget.kd_weight if kd_weight is None else kd_weight)
    runs = {
        "unified": (config_from_dict(train_config_dict(budget, (4, 4, 4, 4),
                                                       budget.level_epochs_k256, seed)), True),
        "sdr16": (config_from_dict(train_config_dict(sdr, (4, 4), sdr.level_epochs_k16,
                                                     seed)), False),
        "sdr256": (config_from_dict(train_config_dict(sdr, (4, 4, 4, 4),
                                                      sdr.level_epochs_k256, seed)), False),
    }
    paths = {}
    for name, (cfg, unified) in runs.items():
        if cfg.total_epochs != budget.total_epochs:
            raise ValueError(f"{name}: {cfg.total_epochs} total epochs != {budget.total_epochs}")
        t0 = time.perf_counter()
        result = train(cfg, out / "runs" / name, unified=unified)
        log.info("pre-training %s: %s in %.0f s", name,
                 "reused" if result.already_done else "trained", time.perf_counter() - t0)
        paths[name] = out / "runs" / name
    return paths


def finetune_accuracy(backbone: Backbone, spec: InputSpec, x_tr: np.ndarray, y_tr: np.ndarray,
                      x_te: np.ndarray, y_te: np.ndarray, num_classes: int, budget: Budget,
                      seed: int) -> float:
    """A few epochs of full fine-tuning (backbone + linear head); test accuracy."""
    model = SubnetModel(copy.deepcopy(backbone), num_classes)
    cfg = LocalTrainConfig(epochs=budget.finetune_epochs, lr=budget.finetune_lr, batch_size=64,
                           mode="full", weight_decay=5e-4, seed=seed)
    train_local(model, x_tr, y_tr, spec, cfg, progress="fine-tune")
    return evaluate_local(model, x_te, y_te, spec).accuracy


def evaluate_task(task: TaskSpec, runs: dict[str, Path], budget: Budget, out: Path,
                  seed: int) -> dict:
    """Unified vs routed sub-nets (K = 16 and 256) on one task."""
    unified, spec = load_teacher(runs["unified"])
    source = load_source(task.source, spec.image_size, spec.channels, limit=task.limit, seed=seed)
    tr, te = split_task(source, TEST_FRACTION, seed)
    x_tr, x_te, y_tr, y_te = source.images[tr], source.images[te], source.labels[tr], source.labels[te]
    n_cls = int(source.labels.max()) + 1
    row: dict = {"task": task.name, "source": task.source, "train_images": len(tr),
                 "test_images": len(te), "classes": n_cls}
    f_tr, f_te = extract_features(unified, x_tr, spec), extract_features(unified, x_te, spec)
    row["unified"] = {
        "probe": linear_probe_accuracy(f_tr, y_tr, f_te, y_te, seed=seed),
        "finetune": finetune_accuracy(unified, spec, x_tr, y_tr, x_te, y_te, n_cls, budget, seed),
    }
    for name, candidates in (("sdr16", budget.candidates_k16), ("sdr256", budget.candidates_k256)):
        result = evaluate_routing(runs[name], task.source, candidates, image_limit=task.limit,
                                  test_fraction=TEST_FRACTION, seed=seed)
        plot_routing(result, out / "report" / f"route_{task.name}_{name}.png")
        net, sdr_spec = load_sdrnet(runs[name])
        routed = net.extract(result["routed_route"]).eval()
        row[name] = {
            "route": result["routed_route"],
            "probe": result["routed_probe_accuracy"],
            "finetune": finetune_accuracy(routed, sdr_spec, x_tr, y_tr, x_te, y_te, n_cls,
                                          budget, seed),
            "teacher_probe": result.get("teacher_probe_accuracy"),
            "best_route": result["best_route"],
            "best_probe": result["best_probe_accuracy"],
            "regret_points": result["regret_points"],
            "selected_regret_points": result["selected_regret_points"],
            "candidates": result["candidates_mode"],
            "num_candidates": result["num_candidates"],
            "spearman": result["spearman_score_vs_probe"],
        }
        log.info("%s %s: route %s probe %.3f (unified %.3f) regret %.2f pts", task.name, name,
                 result["routed_route"], row[name]["probe"], row["unified"]["probe"],
                 row[name]["regret_points"])
    return row


def verdict(rows: list[dict], model: str = "sdr256", metric: str = "probe") -> dict:
    """The claim: routed >= unified on >= 3 of 4 tasks and on average, regret <= 1 point."""
    wins = sum(r[model][metric] >= r["unified"][metric] for r in rows)
    mean_routed = float(np.mean([r[model][metric] for r in rows]))
    mean_unified = float(np.mean([r["unified"][metric] for r in rows]))
    max_regret = float(max(r[model]["regret_points"] for r in rows))
    max_selected = float(max(r[model]["selected_regret_points"] for r in rows))
    return {
        "model": model, "metric": metric, "tasks_won": int(wins), "tasks": len(rows),
        "mean_routed": mean_routed, "mean_unified": mean_unified, "max_regret_points": max_regret,
        "max_selected_regret_points": max_selected,
        "holds": bool(wins >= min(3, len(rows)) and mean_routed >= mean_unified
                      and max_regret <= 1.0),
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| task | unified probe | K=16 routed probe | K=256 routed probe | unified fine-tune "
            "| K=16 fine-tune | K=256 fine-tune | K=256 route | K=256 regret (pts) "
            "| K=256 regret, selection fold (pts) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['task']} | {100 * r['unified']['probe']:.1f} | {100 * r['sdr16']['probe']:.1f} "
            f"| {100 * r['sdr256']['probe']:.1f} | {100 * r['unified']['finetune']:.1f} "
            f"| {100 * r['sdr16']['finetune']:.1f} | {100 * r['sdr256']['finetune']:.1f} "
            f"| {tuple(r['sdr256']['route'])} | {r['sdr256']['regret_points']:.2f} "
            f"| {r['sdr256']['selected_regret_points']:.2f} |")
    return head + "\n".join(lines) + "\n"


def plot_accuracies(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    width = 0.27
    x = np.arange(len(rows))
    for ax, metric, title in ((axes[0], "probe", "linear probe"), (axes[1], "finetune",
                                                                      "few-epoch fine-tune")):
        for i, (model, label) in enumerate((("unified", "unified"), ("sdr16", "routed K=16"),
                                            ("sdr256", "routed K=256"))):
            ax.bar(x + (i - 1) * width, [100 * r[model][metric] for r in rows], width, label=label)
        ax.set_xticks(x, [r["task"] for r in rows])
        lo = min(100 * r[m][metric] for r in rows for m in MODELS)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[dict], summary: dict) -> None:
    from sdr_edge.report.html import Section, update_index

    report = out / "report"
    plot_accuracies(rows, report / "accuracy.png")
    table = [["task", "unified probe", "K=16 probe", "K=256 probe", "unified FT", "K=16 FT",
              "K=256 FT", "K=256 regret"]]
    for r in rows:
        table.append([r["task"]] + [f"{100 * r[m]['probe']:.1f}" for m in MODELS]
                     + [f"{100 * r[m]['finetune']:.1f}" for m in MODELS]
                     + [f"{r['sdr256']['regret_points']:.2f}"])
    v = summary["verdict"]
    text = (f"Command: {summary['command']} — budget {summary['budget']['name']}, "
            f"{summary['seconds'] / 60:.1f} min. Claim (K=256, linear probe): routed ≥ unified on "
            f"{v['tasks_won']}/{v['tasks']} tasks, mean {100 * v['mean_routed']:.1f} vs "
            f"{100 * v['mean_unified']:.1f}, max regret {v['max_regret_points']:.2f} pts: "
            f"{'holds' if v['holds'] else 'does not hold'}.")
    routes = [f"route_{r['task']}_{m}.png" for r in rows for m in ("sdr16", "sdr256")]
    update_index(report, [Section("Paper claim: routed sub-net vs unified model",
                                  ["accuracy.png"], text, table, key="paper-claim"),
                          Section("Routing score vs probe accuracy per task", routes,
                                  key="paper-claim-routes")], title="sdr-edge paper claim")


def run(budget_name: str, out: str | Path, seed: int = 0, argv: list[str] | None = None,
        task_limit: int | None = None, kd_weight: float | None = None) -> dict:
    """The whole benchmark; `task_limit` overrides the budget's images per task (0: all),
    `kd_weight` the SDR runs' SiamKD weight."""
    if budget_name not in BUDGETS:
        raise ValueError(f"unknown budget {budget_name!r} ({', '.join(BUDGETS)})")
    budget = BUDGETS[budget_name]
    if task_limit is not None:
        budget = replace(budget, task_limit=task_limit or None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = pretrain_all(budget, out, seed, kd_weight)
    if budget.threads > 0:  # training restores torch's default; small evals want the budget's
        torch.set_num_threads(budget.threads)
    rows = [evaluate_task(task, runs, budget, out, seed) for task in tasks(budget)]
    summary = {
        "command": " ".join(shlex.quote(a) for a in (argv or sys.argv)),
        "budget": budget.to_dict(),
        "sdr_kd_weight": budget.kd_weight if kd_weight is None else kd_weight,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "tasks": rows,
        "verdict": verdict(rows),
        "verdict_k16": verdict(rows, "sdr16"),
        "verdict_finetune": {"sdr256": verdict(rows, "sdr256", "finetune")},
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    md = (f"Command: `{summary['command']}` (budget `{budget.name}`, seed {seed}, "
          f"{summary['seconds'] / 60:.1f} min)\n\n" + markdown_table(rows))
    atomic_write_text(out / "results.md", md)
    write_report(out, rows, summary)
    return summary
