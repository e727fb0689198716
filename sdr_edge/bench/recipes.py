"""Which SDR recipe makes the experts specialise? Recipes compared on one teacher per seed.

Issue 10 found the routed sub-net barely beats a random sub-net of the same SDRnet: the experts
do not specialise. This study varies, one at a time or combined with "+", what the paper leaves
open (Li et al., "Scalable Dynamic Routing for Task-Customized Sub-Networks", AAAI 2022) and
measures, per downstream task, the routed sub-net against R random routes, the lowest-scored
route, the shared phase-0 teacher and the unified model (linear probe on frozen features).
Every recipe of a seed starts from the same phase-0 teacher (`[schedule] teacher_from`, trained
once by the `base` run), so the recipes differ only in what happens after phase 0. Per run it
also records two diagnostics of specialisation: how pure the level-0 cells are in pool domain
(when the pool is a mix) and how far the experts of each routed stage moved apart.

Runs are locked per run folder, so several processes (one per recipe and seed) can share an
output folder: the second to need a run waits for it and reuses it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.artifacts.run_dir import load_codes, load_sdrnet, load_teacher
from sdr_edge.bench.budgets import Budget, tasks, train_config_dict
from sdr_edge.bench.paper_claim import (
    TEST_FRACTION,
    BenchError,
    fmt,
    interval,
    resolve_budget,
    unified_probe,
)
from sdr_edge.data.sources import load_source
from sdr_edge.models.sdrnet import RoutedStage
from sdr_edge.routing.evaluate import evaluate_routing
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.pipeline import train

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a recipe changes in the budget's K = 256 SDR run."""

    branching: tuple[int, ...]
    level_epochs: tuple[int, ...]
    phase0_epochs: int  # the budget's unless a recipe changes it (then it trains its own teacher)
    overrides: dict[str, dict] = field(default_factory=dict)

    def set(self, table: str, key: str, value: object) -> None:
        self.overrides.setdefault(table, {})[key] = value


def _coarse4(p: Plan) -> None:
    """One routed level (K = 4) at the deepest stage, with every level epoch spent on it: the
    coarse clusters of a mixed pool are its domains, where negative transfer lives."""
    p.branching, p.level_epochs = (p.branching[0],), (sum(p.level_epochs),)


def _deep2(p: Plan) -> None:
    """K = 16: only the two deepest stages routed, the level epochs split over them."""
    total = sum(p.level_epochs)
    p.branching, p.level_epochs = p.branching[:2], (total - total // 2, total // 2)


def _long(p: Plan) -> None:
    """Twice the level epochs: a diagnostic of whether the level-phase budget limits
    specialisation. The run then trains longer than the unified model, so only its
    routed - random (a comparison inside one SDRnet) is a fair figure."""
    p.level_epochs = tuple(2 * e for e in p.level_epochs)


def _early(p: Plan) -> None:
    """Phase 0 shortened by 40 % (10 -> 6 epochs on the cpu budget), the epochs moved to the
    level phases: the experts train apart for longer at the same total epochs as the unified
    model. The run trains its own (shorter) teacher instead of sharing base's."""
    moved = (2 * p.phase0_epochs) // 5
    p.phase0_epochs -= moved
    levels = len(p.level_epochs)
    p.level_epochs = tuple(e + moved // levels + (1 if i < moved % levels else 0)
                           for i, e in enumerate(p.level_epochs))


def _shallow_coarse(p: Plan) -> None:
    """The coarsest level served by the shallowest routed stage (the default is the deepest)."""
    p.set("routing", "level_stages", list(range(len(p.branching))))


def _clamped(p: Plan) -> None:
    """The views' crop as the code of rounds 1-4 drew it (round 6 isolated it as the cause of
    today's code scoring lower there)."""
    p.set("augment", "crop_mode", "clamped")
    p.set("augment", "crop_min", 0.3)


RECIPES: dict[str, tuple[str, Callable[[Plan], None]]] = {
    "base": ("the paper's K = 256 (the library default when the study ran), coarsest level at "
             "the deepest stage, SiamKD 0.5", lambda p: None),
    "kd0": ("no SiamKD toward the teacher (kd_weight 0): experts free to drift",
            lambda p: p.set("ssl", "kd_weight", 0.0)),
    "kd0.9": ("strong SiamKD (kd_weight 0.9)", lambda p: p.set("ssl", "kd_weight", 0.9)),
    "experts": ("level phases train only the routed experts and heads (stem and shared stages "
                "stay the teacher's)", lambda p: p.set("schedule", "level_train", "experts")),
    "lr0.2": ("level phases restart at 0.2 x the base learning rate",
              lambda p: p.set("schedule", "level_lr_scale", 0.2)),
    "lr1": ("level phases restart at the base learning rate (the default before round 7)",
            lambda p: p.set("schedule", "level_lr_scale", 1.0)),
    "lr2": ("level phases restart at 2 x the base learning rate (the default since round 7)",
            lambda p: p.set("schedule", "level_lr_scale", 2.0)),
    "elr": ("per-cell expert learning rate: a stage of B experts learns at B x the rate "
            "(the batch mean gives each expert ~1/B of the gradient)",
            lambda p: p.set("schedule", "expert_lr", "per-cell")),
    "coarse4": ("K = 4: one routed level at the deepest stage, all level epochs on it", _coarse4),
    "deep2": ("K = 16: the two deepest stages routed (the library default since round 4)",
              _deep2),
    "shallow-coarse": ("coarsest level at the shallowest stage", _shallow_coarse),
    "early": ("phase 0 shortened by 40 %, its epochs given to the level phases (same total; "
              "own teacher)", _early),
    "long": ("twice the level epochs (diagnostic: more total epochs than the unified model)",
             _long),
    "crop0.3": ("random resized crops of 30-100 % of the image, the default before round 6 "
                "(now 40-100 %)", lambda p: p.set("augment", "crop_min", 0.3)),
    "clamped": ("the crop before issue 13's rewrite: one (area, aspect) draw of 30-100 % of "
                "the image, each side clamped to it", _clamped),
    "tree": ("tree codes: hierarchical k-means, each level splitting its parent's cell, one "
             "expert per tree node (the default is residual codes)",
             lambda p: p.set("routing", "codes", "tree")),
}


def parse_recipes(text: str) -> list[str]:
    """Comma-separated recipe names, each one recipe or several joined by '+' (applied in order);
    `base` always comes first, because every other recipe takes its teacher."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BenchError("--recipes: give at least one recipe")
    for name in names:
        for part in name.split("+"):
            if part not in RECIPES:
                raise BenchError(f"--recipes: unknown recipe {part!r} ({', '.join(RECIPES)})")
    return ["base", *[n for n in dict.fromkeys(names) if n != "base"]]


def plan_of(budget: Budget, name: str) -> Plan:
    plan = Plan((4, 4, 4, 4), tuple(budget.level_epochs_k256), budget.phase0_epochs)
    for part in name.split("+"):
        RECIPES[part][1](plan)
    return plan


def recipe_config(budget: Budget, name: str, seed: int, teacher_run: Path | None) -> dict:
    """The training config of recipe `name` (base trains the teacher; others borrow it)."""
    plan = plan_of(budget, name)
    cfg = train_config_dict(budget, plan.branching, plan.level_epochs, seed)
    for table, values in plan.overrides.items():
        cfg.setdefault(table, {}).update(values)
    own_teacher = plan.phase0_epochs != budget.phase0_epochs
    if own_teacher:
        cfg["schedule"]["phase0_epochs"] = plan.phase0_epochs
    if teacher_run is not None and name != "base" and not own_teacher:
        cfg["schedule"]["teacher_from"] = str(teacher_run)
    return cfg


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside a run folder: one process trains it, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def borrowed_teacher(cfg_dict: dict, base: Path, poll_s: float = 15.0) -> Path:
    """The base run's phase-0 teacher: train base when nobody does; when another process is
    training it, wait only for its teacher file, not for its level phases and kit."""
    lock = open(base.with_name(base.name + ".lock"), "w")  # noqa: SIM115 (held across the wait)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            while not (base / "teacher.safetensors").is_file():
                time.sleep(poll_s)
            return base
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        lock.close()
    return train_locked(cfg_dict, base)


def train_locked(cfg_dict: dict, run: Path, unified: bool = False) -> Path:
    with run_lock(run):
        t0 = time.perf_counter()
        result = train(config_from_dict(cfg_dict), run, unified=unified)
        log.info("%s: %s in %.0f s", run, "reused" if result.already_done else "trained",
                 time.perf_counter() - t0)
    return run


# ----- diagnostics of specialisation ----------------------------------------------------------

def domain_purity(run: Path, budget: Budget, seed: int) -> float | None:
    """Mean over pool images of the share of its level-0 cell that comes from its own domain
    (a mixed pool labels each image with its part); None for a single-source pool."""
    if not budget.pool.startswith("mix:"):
        return None
    codes, _ = load_codes(run)
    source = load_source(budget.pool, budget.image_size, 1, budget.pool_limit, seed)
    if source.labels is None or len(source) != codes.shape[0]:
        return None
    cell, domain = codes[:, 0].numpy(), source.labels
    share = 0.0
    for c in np.unique(cell):
        members = domain[cell == c]
        share += float(np.bincount(members).max())
    return share / len(cell)


def expert_spread(run: Path) -> list[float]:
    """Per routed stage (in level order): mean pairwise L2 distance between its experts'
    weights over the norm of the teacher's stage. 0: the experts are still one copy."""
    net, _ = load_sdrnet(run)
    teacher, _ = load_teacher(run)
    out = []
    for stage_index in net.level_stages:
        stage = net.stages[stage_index]
        assert isinstance(stage, RoutedStage)
        flat = [torch.cat([p.detach().flatten() for p in e.parameters()]) for e in stage.experts]
        ref = torch.cat([p.detach().flatten() for p in teacher.stages[stage_index].parameters()])
        dists = [float((a - b).norm()) for i, a in enumerate(flat) for b in flat[i + 1:]]
        out.append(float(np.mean(dists)) / max(float(ref.norm()), 1e-12) if dists else 0.0)
    return out


# ----- evaluation -------------------------------------------------------------------------------

def evaluate_recipe(run: Path, unified: dict[str, float], budget: Budget, seed: int) -> dict:
    """One (recipe, seed): per task the routed sub-net and its controls, plus the diagnostics."""
    rows = []
    for task in tasks(budget):
        r = evaluate_routing(run, task.source, 1, image_limit=task.limit,
                             test_fraction=TEST_FRACTION, seed=seed,
                             random_routes=budget.random_routes, progress=False)
        rows.append({
            "task": task.name, "route": r["routed_route"], "routed": r["routed_probe_accuracy"],
            "random": r.get("random_probe_accuracy"), "lowest": r.get("lowest_probe_accuracy"),
            "teacher": r.get("teacher_probe_accuracy"), "unified": unified[task.name],
            "routed_minus_random": r.get("routed_minus_random_points"),
            "routed_minus_unified": 100.0 * (r["routed_probe_accuracy"] - unified[task.name]),
            "best_control_minus_routed": 100.0 * (max(
                [c["probe_accuracy"] for c in r.get("controls", [])], default=0.0)
                - r["routed_probe_accuracy"]),
        })
        log.info("seed %d %s %s: routed %.3f random %.3f unified %.3f", seed, run.name,
                 task.name, rows[-1]["routed"], rows[-1]["random"] or float("nan"),
                 unified[task.name])
    return {"tasks": rows, "domain_purity": domain_purity(run, budget, seed),
            "expert_spread": expert_spread(run)}


def _eval_path(root: Path, name: str) -> Path:
    return root / f"recipe_{name}.json"


def run_seed(budget: Budget, root: Path, seed: int, names: list[str]) -> dict[str, dict]:
    """Train (or reuse) base, the recipes and the unified model of one seed; evaluate each
    recipe once (cached per recipe, so parallel processes of one seed do not collide)."""
    base_cfg = recipe_config(budget, "base", seed, None)
    base = root / "base"
    root.mkdir(parents=True, exist_ok=True)
    if len(names) > 1:
        borrowed_teacher(base_cfg, base)
    runs = {}
    for name in names[1:]:
        runs[name] = train_locked(recipe_config(budget, name, seed, base), root / name)
    runs = {"base": train_locked(base_cfg, base), **runs}
    unified_run = train_locked(train_config_dict(budget, (4, 4, 4, 4), budget.level_epochs_k256,
                                                 seed), root / "unified", unified=True)
    if budget.threads > 0:
        torch.set_num_threads(budget.threads)
    key = {"budget": budget.to_dict(), "seed": seed, "tasks": [t.name for t in tasks(budget)]}
    results: dict[str, dict] = {}
    unified: dict[str, float] | None = None
    for name, run in runs.items():
        path = _eval_path(root, name)
        with run_lock(path):  # parallel processes of one seed evaluate base once
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("key") == json.loads(json.dumps(key)):
                    results[name] = stored["result"]
                    continue
            except (OSError, ValueError):
                pass
            if unified is None:
                unified = {t.name: unified_probe(unified_run, t, seed) for t in tasks(budget)}
            results[name] = {"recipe": name, "seed": seed,
                             **evaluate_recipe(run, unified, budget, seed)}
            atomic_write_text(path, json.dumps({"key": key, "result": results[name]},
                                               indent=1) + "\n")
    return results


# ----- aggregation and report -----------------------------------------------------------------

METRICS = ("routed", "random", "lowest", "teacher", "unified", "routed_minus_random",
           "routed_minus_unified")


def aggregate(per_seed: list[dict[str, dict]], names: list[str]) -> dict:
    """Per recipe: every metric's mean over tasks, then mean ± 95 % interval over seeds; and the
    per-task routed − random over seeds."""
    out: dict = {}
    for name in names:
        evals = [s[name] for s in per_seed if name in s]
        rec: dict = {"seeds": [e["seed"] for e in evals], "description": " + ".join(
            RECIPES[p][0] for p in name.split("+"))}
        for m in METRICS:
            per = [np.mean([t[m] for t in e["tasks"] if t[m] is not None]) for e in evals]
            rec[m] = interval([float(v) for v in per])
        names_t = [t["task"] for t in evals[0]["tasks"]] if evals else []
        rec["per_task_routed_minus_random"] = {
            tn: interval([e["tasks"][i]["routed_minus_random"] for e in evals])
            for i, tn in enumerate(names_t)}
        rec["domain_purity"] = interval([e["domain_purity"] for e in evals])
        spreads = [e["expert_spread"] for e in evals]
        rec["expert_spread"] = [float(np.mean([s[i] for s in spreads]))
                                for i in range(min(map(len, spreads)))] if spreads else []
        out[name] = rec
    return out


def markdown(agg: dict) -> str:
    head = ("| recipe | routed | random (mean of R) | lowest-scored | teacher | unified | "
            "routed − random (pts) | routed − unified (pts) | level-0 domain purity | "
            "expert spread per level |")
    lines = [head, "|" + "---|" * 10]
    for name, r in agg.items():
        spread = ", ".join(f"{100 * v:.1f} %" for v in r["expert_spread"])
        lines.append(
            f"| {name} | {fmt(r['routed'], 100)} | {fmt(r['random'], 100)} | "
            f"{fmt(r['lowest'], 100)} | {fmt(r['teacher'], 100)} | {fmt(r['unified'], 100)} | "
            f"{fmt(r['routed_minus_random'], signed=True)} | "
            f"{fmt(r['routed_minus_unified'], signed=True)} | {fmt(r['domain_purity'], 100)} | "
            f"{spread} |")
    lines += ["", "Per task, routed − random (pts):", ""]
    tasks_ = list(next(iter(agg.values()))["per_task_routed_minus_random"]) if agg else []
    lines.append("| recipe | " + " | ".join(tasks_) + " |")
    lines.append("|" + "---|" * (len(tasks_) + 1))
    for name, r in agg.items():
        cells = [fmt(r["per_task_routed_minus_random"][t], signed=True) for t in tasks_]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracies are linear-probe %, mean over tasks, then mean ± 95 % interval "
              "over seeds; every recipe of a seed shares base's phase-0 teacher."]
    return "\n".join(lines) + "\n"


def run(budget_name: str, out: str | Path, recipes: str, seed: int = 0, seeds: int = 1,
        argv: list[str] | None = None, **budget_options) -> dict:
    """`sdr-server bench --recipes A,B+C`: the study over seeds `seed … seed + seeds − 1`."""
    if seeds < 1:
        raise BenchError(f"--seeds must be at least 1, got {seeds}")
    names = parse_recipes(recipes)
    budget = resolve_budget(budget_name, **budget_options)
    out = Path(out)
    t0 = time.perf_counter()
    per_seed = [run_seed(budget, out / "runs" / f"seed{s}", s, names)
                for s in range(seed, seed + seeds)]
    agg = aggregate(per_seed, names)
    summary = {"command": " ".join(shlex.quote(a) for a in (argv or sys.argv)),
               "budget": budget.to_dict(), "recipes": names, "seeds": list(range(seed, seed + seeds)),
               "seconds": time.perf_counter() - t0, "per_seed": per_seed, "aggregate": agg}
    atomic_write_text(out / "recipes.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "recipes.md", markdown(agg))
    return summary
