"""A pre-training pool of distinct domains, its downstream tasks, and negative transfer on it.

SDR's premise is negative transfer: one model trained on everything can lose, on a task, to a
model trained only on the part of the pool that matches the task. This module defines the
mixed pool (clothing + printed glyphs), tasks tied to one domain each, and the paper's
preliminary experiment: the same backbone pre-trained with SimSiam for the same epochs on
domain A only, domain B only and the whole pool, then linear-probed on every task.

API for other benchmarks (the SDR bench uses the same pool and tasks):

* ``MIXED_POOL`` — the pool spec for ``load_source``; with ``limit=L`` each domain gets L/2.
* ``pools(part_limit)`` — {"fashion", "glyphs", "mixed"} -> (source spec, limit); the mixed
  pool is exactly the union of the two single-domain pools (same seed, same subsets).
* ``domain_tasks(limit)`` — the labelled tasks (``TaskSpec``); ``TASK_DOMAINS`` names each
  task's matching domain (None: neither).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sdr_edge.bench.budgets import BUDGETS, TaskSpec, train_config_dict

log = logging.getLogger(__name__)

FASHION_POOL = "fashion-mnist:train"
GLYPH_POOL = "glyphs:latin,cyrillic"  # pool fonts only (see sdr_edge.data.glyphs)
MIXED_POOL = f"mix:{FASHION_POOL}+{GLYPH_POOL}"
POOL_DOMAINS = {"fashion": FASHION_POOL, "glyphs": GLYPH_POOL}
POOL_NAMES = ("fashion", "glyphs", "mixed")
TEST_FRACTION = 0.3

# Task -> the pool domain it belongs to (None: neither domain; compared with the best single).
TASK_DOMAINS: dict[str, str | None] = {
    "footwear-3": "fashion",
    "tops-4": "fashion",
    "cyrillic-heldout": "glyphs",   # a pool script in font families held out of the pool
    "greek-heldout": "glyphs",      # a script outside the pool, printed, held-out families
    "devanagari-heldout": "glyphs",  # a far script outside the pool
    "digits-10": None,              # handwritten digits: outside both domains
}


def pools(part_limit: int | None) -> dict[str, tuple[str, int | None]]:
    """Pool name -> (source spec, limit): fashion only, glyphs only, and both (their union)."""
    return {
        "fashion": (FASHION_POOL, part_limit),
        "glyphs": (GLYPH_POOL, part_limit),
        "mixed": (MIXED_POOL, None if part_limit is None else 2 * part_limit),
    }


def domain_tasks(limit: int | None = 2000) -> list[TaskSpec]:
    """Downstream tasks tied to one domain each (and one outside both); `limit` caps each."""
    return [
        TaskSpec("footwear-3", "fashion-mnist:test@5,7,9", limit),
        TaskSpec("tops-4", "fashion-mnist:test@0,2,4,6", limit),
        TaskSpec("cyrillic-heldout", "glyphs:cyrillic:heldout", limit),
        TaskSpec("greek-heldout", "glyphs:greek:heldout", limit),
        TaskSpec("devanagari-heldout", "glyphs:devanagari:heldout", limit),
        TaskSpec("digits-10", "builtin:digits", limit),
    ]


@dataclass(frozen=True)
class NegativeTransferConfig:
    """One experiment: every pool trains the same backbone for the same epochs."""

    epochs: int = 18
    pool_limit: int | None = 12000  # images per domain; the mixed pool has twice as many
    seeds: int = 3                  # probe split seeds per task
    task_limit: int | None = 2000
    threads: int = 1
    train_seed: int = 0
    budget: str = "cpu"             # backbone, batch and SSL settings of this bench budget


def pretrain_config(cfg: NegativeTransferConfig, source: str, limit: int | None) -> dict:
    """The `sdr-server train` config dict of one unified SimSiam run (same for every pool)."""
    budget = replace(BUDGETS[cfg.budget], pool=source, pool_limit=limit,
                     phase0_epochs=cfg.epochs, level_epochs_k256=(0, 0, 0, 0),
                     threads=cfg.threads)
    raw = train_config_dict(budget, (4, 4, 4, 4), budget.level_epochs_k256, cfg.train_seed)
    raw["train"]["knn_every"] = 0
    raw["data"]["val_fraction"] = 0.0  # no kNN monitor: every pool trains on all its images
    return raw


def run_dir_name(cfg: NegativeTransferConfig, pool: str) -> str:
    """Runs are keyed by what they train, so a rerun with other flags never clashes."""
    limit = "all" if cfg.pool_limit is None else str(cfg.pool_limit)
    return f"{pool}-{cfg.budget}-e{cfg.epochs}-n{limit}-s{cfg.train_seed}"


def pretrain_pools(cfg: NegativeTransferConfig, out: Path) -> dict[str, dict]:
    """Train (or reuse) the unified model of every pool; name -> {run_dir, seconds, images}."""
    from sdr_edge.training.config import config_from_dict
    from sdr_edge.training.pipeline import train

    done = {}
    for name, (source, limit) in pools(cfg.pool_limit).items():
        run_dir = out / "runs" / run_dir_name(cfg, name)
        t0 = time.perf_counter()
        result = train(config_from_dict(pretrain_config(cfg, source, limit)), run_dir,
                       unified=True)
        seconds = time.perf_counter() - t0
        log.info("pool %s: %s %d images in %.0f s", name,
                 "reused" if result.already_done else "trained", result.num_images, seconds)
        done[name] = {"run_dir": str(run_dir), "source": source, "limit": limit,
                      "images": result.num_images, "reused": result.already_done,
                      "seconds": round(seconds, 1)}
    return done


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "runs": [float(v) for v in arr]}


def probe_pools(cfg: NegativeTransferConfig, runs: dict[str, dict],
                tasks: list[TaskSpec]) -> list[dict]:
    """Linear-probe accuracy of every pool's model on every task, over `cfg.seeds` splits."""
    import torch

    from sdr_edge.artifacts.run_dir import load_teacher
    from sdr_edge.data.sources import load_source
    from sdr_edge.routing.evaluate import split_task
    from sdr_edge.routing.probe import extract_features, linear_probe_accuracy

    models = {name: load_teacher(r["run_dir"]) for name, r in runs.items()}
    specs = {(s.image_size, s.channels) for _, s in models.values()}
    if len(specs) != 1:
        raise ValueError(f"pool models disagree on the input size: {sorted(specs)}")
    size, channels = specs.pop()
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(cfg.threads, 1))
    try:
        for task in tasks:
            source = load_source(task.source, size, channels, limit=task.limit, seed=0)
            splits = [split_task(source, TEST_FRACTION, seed) for seed in range(cfg.seeds)]
            row: dict = {"task": task.name, "source": task.source,
                         "domain": TASK_DOMAINS.get(task.name), "images": len(source),
                         "classes": int(source.labels.max()) + 1,
                         "test_images": int(len(splits[0][1]))}
            for name, (model, spec) in models.items():
                feats = extract_features(model, source.images, spec)
                accs = [linear_probe_accuracy(feats[tr], source.labels[tr], feats[te],
                                              source.labels[te], seed=seed)
                        for seed, (tr, te) in enumerate(splits)]
                row[name] = _summary(accs)
            row.update(compare(row))
            log.info("%s: %s", task.name, "  ".join(
                f"{n} {100 * row[n]['mean']:.1f}" for n in models))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def compare(row: dict) -> dict:
    """Mixed pool vs the matching single-domain model (best single when the task has none)."""
    singles = [n for n in POOL_DOMAINS if n in row]
    if "mixed" not in row or not singles:
        return {}
    best = max(singles, key=lambda n: row[n]["mean"])
    match = row.get("domain") or best
    gap = 100 * (row["mixed"]["mean"] - row[match]["mean"])
    noise = 100 * float(np.hypot(row["mixed"]["std"], row[match]["std"]))
    return {"matching_pool": match, "best_single": best,
            "mixed_minus_matching_points": round(gap, 2), "noise_points": round(noise, 2),
            "negative_transfer": bool(gap < 0),
            "mixed_minus_best_single_points": round(
                100 * (row["mixed"]["mean"] - row[best]["mean"]), 2)}


def markdown_table(rows: list[dict]) -> str:
    """Per-task probe accuracy (mean ± std, %) for each pool and the mixed-vs-matching gap."""
    lines = ["| task | domain | fashion only | glyphs only | whole pool | whole − matching (pts) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * r[n]['mean']:.1f} ± {100 * r[n]['std']:.1f}" if n in r else "-"
                 for n in POOL_NAMES]
        gap = r.get("mixed_minus_matching_points")
        mark = f"{gap:+.1f} vs {r['matching_pool']}" if gap is not None else "-"
        lines.append(f"| {r['task']} | {r['domain'] or 'neither'} | " + " | ".join(cells)
                     + f" | {mark} |")
    return "\n".join(lines) + "\n"


def check_fonts(specs: list[str]) -> None:
    """Fail before any training when a glyph source has no fonts (error names the package)."""
    from sdr_edge.data import glyphs
    from sdr_edge.data.sources import MIX_PREFIX, parse_mix, split_class_filter

    parts = [p for s in specs
             for p in ([q for q, _ in parse_mix(s)] if s.startswith(MIX_PREFIX) else [s])]
    for part in parts:
        base, _ = split_class_filter(part)
        if base.startswith("glyphs:"):
            gspec = glyphs.parse_glyph_spec(base)
            for script in gspec.scripts:
                glyphs.fonts_for(script, gspec.font_set)


def run_negative_transfer(cfg: NegativeTransferConfig, out: str | Path,
                          tasks: list[TaskSpec] | None = None) -> dict:
    """Pre-train the three pools (finished runs are reused), probe every task, write results."""
    out = Path(out)
    if cfg.epochs < 1 or cfg.seeds < 1:
        raise ValueError("--epochs and --seeds must be >= 1")
    tasks = domain_tasks(cfg.task_limit) if tasks is None else tasks
    check_fonts([src for src, _ in pools(cfg.pool_limit).values()] + [t.source for t in tasks])
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runs = pretrain_pools(cfg, out)
    train_s = time.perf_counter() - t0
    rows = probe_pools(cfg, runs, tasks)
    losses = [r["task"] for r in rows if r.get("negative_transfer")]
    result = {
        "config": asdict(cfg), "pools": runs, "tasks": rows,
        "negative_transfer_tasks": losses, "pool_is_good": bool(losses),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t0 - train_s, 1),
        "loadavg_start": [round(v, 2) for v in load_before],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown_table(rows))
    return result
