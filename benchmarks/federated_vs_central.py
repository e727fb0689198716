"""Federated vs centralised fine-tuning of the same routed sub-net: a grid over partitions,
fleet sizes and strategies, several seeds, per-round curves, bytes per round.

Federated: the ServerApp's own flow (`run_federation`: signature query, routing by the
aggregated signature, the configured strategy and round schedule, evaluation on every node's
held-out split) over N nodes holding IID or Dirichlet(alpha) partitions. It runs IN-PROCESS
on `LocalGrid` (the ClientApp handlers called directly, no SuperLink, no network), so a cell
takes seconds to a minute; messages, strategies and train/eval code are the ones the
Deployment Engine runs (tests/lib/federated/test_federation_*).

Central: the same sub-net with the same initial head, trained with the fine-tune recipe
(`sdr_edge.training.finetune`, its defaults: AdamW 1e-3, cosine, 10 epochs) on the union of
the nodes' training splits, evaluated on the union of their held-out splits. One central run per (task, nodes, alpha, seed) serves every
strategy.

Each strategy is a preset name, optionally with run-config overrides joined by '+':
`fedavg`, `fedavgm`, `fedprox`, `fedadam`, `fedyogi`, `fedbn`, `fedtrimmedavg`, `fedmedian`, `krum`,
`multikrum`, `bulyan`, or e.g. `fedavg+lr=0.001+head-rounds=2`. `--byzantine K --attack
scale|random|nan` makes K nodes poison their training replies (robust aggregation).

    python benchmarks/federated_vs_central.py --run-dir RUN --task footwear-3 \
        --alpha 0,0.5,0.1 --nodes 4 --strategies fedavg,fedprox,fedbn --seeds 3 \
        --out runs/fed/grid.json --report runs/fed/report
Prints one JSON object (also written to --out); --report writes plots and an index.html.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdr_edge.artifacts.bundle import load_bundle  # noqa: E402
from sdr_edge.artifacts.run_dir import load_sdrnet  # noqa: E402
from sdr_edge.artifacts.signing import generate_keypair, load_public_key  # noqa: E402
from sdr_edge.bench.paper_claim import interval  # noqa: E402
from sdr_edge.federated.client_app import app  # noqa: E402
from sdr_edge.federated.config import FederationConfig  # noqa: E402
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data  # noqa: E402
from sdr_edge.federated.server_flow import run_federation  # noqa: E402
from sdr_edge.federated.testing import (  # noqa: E402
    ATTACKS,
    ByzantineApp,
    LocalGrid,
    server_identity,
)
from sdr_edge.models.classifier import SubnetModel  # noqa: E402
from sdr_edge.training.finetune import FineTuneConfig, evaluate_local, train_local  # noqa: E402

TASKS = {"footwear-3": "fashion-mnist:test@5,7,9", "fashion-10": "fashion-mnist:test",
         "tops-4": "fashion-mnist:test@0,2,4,6", "digits-10": "builtin:digits"}
PRESETS: dict[str, dict[str, object]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedavgm": {"strategy": "fedavgm", "server-lr": 1.0, "server-momentum": 0.9},
    "fedprox": {"strategy": "fedprox", "proximal-mu": 0.01},
    "fedadam": {"strategy": "fedadam", "server-lr": 0.001},
    "fedyogi": {"strategy": "fedyogi", "server-lr": 0.001},
    "fedbn": {"strategy": "fedavg", "fedbn": True},
    "fedtrimmedavg": {"strategy": "fedtrimmedavg", "trim-beta": 0.25},
    "fedmedian": {"strategy": "fedmedian"},
    "krum": {"strategy": "krum", "malicious-nodes": 1},
    "multikrum": {"strategy": "multikrum", "malicious-nodes": 1},
    "bulyan": {"strategy": "bulyan", "malicious-nodes": 1},
}


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def strategy_overrides(spec: str) -> dict[str, object]:
    """'fedavg+lr=0.001+fedbn=true' -> the preset's run-config keys plus the overrides."""
    name, *extra = spec.split("+")
    if name not in PRESETS:
        raise SystemExit(f"--strategies: unknown preset {name!r} (one of {sorted(PRESETS)})")
    out = dict(PRESETS[name])
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--strategies: {item!r} in {spec!r} is not KEY=VALUE")
        out[key] = _value(value)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished sdr-server train run")
    p.add_argument("--task", action="append", default=[],
                   help=f"NAME (one of {sorted(TASKS)}) or NAME=SOURCE; repeatable")
    p.add_argument("--limit", type=int, default=2000, help="seeded subset of each source first")
    p.add_argument("--nodes", default="4", help="comma list of fleet sizes")
    p.add_argument("--alpha", default="0.5", help="comma list of Dirichlet alphas; 0: IID")
    p.add_argument("--strategies", default="fedavg", help="comma list of presets (see above)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every federated run")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=None,
                   help="federated local epochs per round (default: the run config's)")
    p.add_argument("--lr", type=float, default=None,
                   help="federated peak lr (default: the run config's, ROUND_LR)")
    p.add_argument("--central-epochs", type=int, default=FineTuneConfig.epochs,
                   help="central fine-tune epochs (default: the recipe's)")
    p.add_argument("--central-lr", type=float, default=FineTuneConfig.lr)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3, help="partition/init seeds 0..n-1")
    p.add_argument("--byzantine", type=int, default=0, help="nodes that poison their updates")
    p.add_argument("--attack", default="scale", choices=ATTACKS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--report", type=Path, help="write per-round plots and index.html here")
    args = p.parse_args()
    args.tasks = {}
    for item in args.task or ["footwear-3"]:
        name, sep, source = item.partition("=")
        if not sep and name not in TASKS:
            raise SystemExit(f"--task {name!r}: not one of {sorted(TASKS)}; give NAME=SOURCE")
        args.tasks[name] = source if sep else TASKS[name]
    args.node_counts = [int(v) for v in args.nodes.split(",")]
    args.alphas = [float(v) for v in args.alpha.split(",")]
    args.strategy_specs = args.strategies.split(",")
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        args.overrides[key] = _value(value)
    return args


def node_configs(source: str, nodes: int, alpha: float, seed: int, limit: int,
                 kit_dir: Path) -> list[dict]:
    return [{"data": source, "partition-id": i, "num-partitions": nodes, "alpha": alpha,
             "partition-seed": seed, "limit": limit, "kit-dir": str(kit_dir)}
            for i in range(nodes)]


def node_parts(args, source: str, nodes: int, alpha: float, seed: int, spec):
    return [load_node_data(NodeDataConfig(source, i, nodes, alpha, seed, args.limit or None),
                           spec.image_size, spec.channels) for i in range(nodes)]


def union(parts, split: str) -> tuple[np.ndarray, np.ndarray]:
    chosen = [getattr(p, split) for p in parts]
    return (np.concatenate([c.images for c in chosen]),
            np.concatenate([c.labels for c in chosen]))  # type: ignore[misc]


def last_swing(curve: dict[int, float], last: int = 3) -> float | None:
    """Max - min accuracy (points) over the last `last` rounds."""
    tail = [curve[r] for r in sorted(curve) if r >= 1][-last:]
    return round(100 * (max(tail) - min(tail)), 2) if len(tail) >= 2 else None


def federated(args, source: str, nodes: int, alpha: float, spec_name: str, seed: int,
              work: Path, key: Path) -> dict:
    out = work / f"fed-{abs(hash((source, nodes, alpha, spec_name, seed)))}"
    run_config = {"run-dir": str(args.run_dir), "signing-key": str(key), "out-dir": str(out),
                  "num-server-rounds": args.rounds, "batch-size": args.batch_size,
                  **({"local-epochs": args.local_epochs} if args.local_epochs else {}),
                  **({"lr": args.lr} if args.lr else {}), "min-nodes": nodes,
                  "min-round-nodes": nodes, "seed": seed,
                  **args.overrides, **strategy_overrides(spec_name)}
    cfg = FederationConfig.from_run_config(run_config)
    configs = node_configs(source, nodes, alpha, seed, args.limit, args.run_dir / "kit")
    client = (ByzantineApp(app, set(range(args.byzantine)), args.attack, seed)
              if args.byzantine else app)
    started = time.perf_counter()
    with server_identity():
        summary = run_federation(LocalGrid(client, configs), cfg)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    rows = json.loads((out / "summary.json").read_text())["rounds"]
    trained = [r for r in rows if r["round"] >= 1]
    curve = {int(r["round"]): round(r["eval-accuracy"], 4) for r in rows if "eval-accuracy" in r}
    refused = sorted({n for r in rows for n in r.get("train_refused", {})})
    return {"route": summary["route"], "final_accuracy": summary["final_accuracy"],
            "bundle": str(out / "bundle"), "accuracy_per_round": curve,
            "last3_swing_points": last_swing(curve),
            "bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in trained])),
            "bytes_up_per_round": int(np.mean([r["bytes_up"] for r in trained])),
            "refused_nodes": refused,
            "subnet_bytes": summary["subnet_bytes"], "sdrnet_bytes": summary["sdrnet_bytes"],
            "seconds": round(seconds, 2)}


def bundle_accuracy(bundle_dir: str, pub: Path, x: np.ndarray, y: np.ndarray) -> float:
    """The saved (signed) bundle on the union of held-out splits: what a new device gets."""
    bundle = load_bundle(bundle_dir, load_public_key(pub))
    return float(evaluate_local(bundle.model, x, y, bundle.input_spec).accuracy)


def central(args, net, parts, spec, route: list[int], seed: int) -> dict:
    """`net` is only read: `extract` copies the routed experts into a new backbone."""
    torch.manual_seed(seed)  # same head initialisation as run_federation
    model = SubnetModel(net.extract(route).eval(), parts[0].num_classes)
    x_train, y_train = union(parts, "train")
    x_test, y_test = union(parts, "test")
    started = time.perf_counter()
    train_local(model, x_train, y_train, spec, FineTuneConfig(
        epochs=args.central_epochs, lr=args.central_lr, batch_size=args.batch_size,
        seed=seed), progress="central")
    result = evaluate_local(model, x_test, y_test, spec)
    return {"final_accuracy": result.accuracy, "train_images": int(len(y_train)),
            "test_images": int(len(y_test)), "seconds": round(time.perf_counter() - started, 2)}


def label_skew(parts) -> float:
    """Mean total-variation distance of the nodes' label histograms from the union's."""
    ys = [p.train.labels for p in parts]
    k = int(max(y.max() for y in ys)) + 1
    hist = [np.bincount(y, minlength=k) / len(y) for y in ys]
    whole = np.bincount(np.concatenate(ys), minlength=k) / sum(len(y) for y in ys)
    return round(float(np.mean([0.5 * np.abs(h - whole).sum() for h in hist])), 3)


def plot_cell_curves(path: Path, title: str, curves: dict[str, list[dict]],
                     central_mean: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, per_seed in curves.items():
        rounds = sorted(set.intersection(*(set(c) for c in per_seed)))
        mean = [np.mean([c[r] for c in per_seed]) for r in rounds]
        lo = [np.min([c[r] for c in per_seed]) for r in rounds]
        hi = [np.max([c[r] for c in per_seed]) for r in rounds]
        line, = ax.plot(rounds, mean, marker="o", ms=3, label=label)
        ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(central_mean, color="k", ls="--", lw=1, label="central (mean)")
    ax.set_xlabel("round (0: routed sub-net, fresh head)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(cells: list[dict]) -> list[dict]:
    rows = []
    for cell in cells:
        gaps = [r["gap_points"] for r in cell["runs"]]
        bundle_gaps = [r["bundle_gap_points"] for r in cell["runs"]]
        swings = [r["federated"]["last3_swing_points"] for r in cell["runs"]]
        fed = [100 * r["federated"]["final_accuracy"] for r in cell["runs"]]
        rows.append({k: cell[k] for k in ("task", "nodes", "alpha", "strategy")} | {
            "federated": interval(fed), "gap_points": interval(gaps),
            "bundle_gap_points": interval(bundle_gaps),
            "last3_swing_points_max": max(s for s in swings if s is not None) if any(
                s is not None for s in swings) else None,
            "bytes_per_round": cell["runs"][0]["federated"]["bytes_per_round"]})
    return rows


def write_report(report: Path, result: dict, curves: dict, centrals: dict) -> None:
    from sdr_edge.report.html import Section, write_index

    sections = []
    for (task, nodes, alpha), per_strategy in curves.items():
        name = f"{task}_n{nodes}_a{alpha:g}".replace(".", "p")
        path = report / f"rounds_{name}.png"
        part = "IID" if alpha <= 0 else f"Dirichlet alpha={alpha:g}"
        plot_cell_curves(path, f"{task}, {nodes} nodes, {part} (band: min-max over seeds)",
                         per_strategy, float(np.mean(centrals[(task, nodes, alpha)])))
        table = [["strategy", "federated %", "gap to central (points)", "bundle gap",
                  "last-3 swing max", "bytes/round"]]
        for row in result["summary"]:
            if (row["task"], row["nodes"], row["alpha"]) != (task, nodes, alpha):
                continue
            g, b, f = row["gap_points"], row["bundle_gap_points"], row["federated"]
            table.append([row["strategy"], f"{f['mean']:.1f}",
                          f"{g['mean']:+.2f} ± {g['ci95'] or 0:.2f}",
                          f"{b['mean']:+.2f}", f"{row['last3_swing_points_max']}",
                          f"{row['bytes_per_round']:,}"])
        sections.append(Section(f"{task}, {nodes} nodes, {part}", images=[path], table=table))
    write_index(report, sections, "federated vs central")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # keep stdout for the JSON
    cells, curves, centrals = [], {}, {}
    started = time.time()
    net, spec = load_sdrnet(args.run_dir)  # once: central extracts each route from it
    with tempfile.TemporaryDirectory(prefix="fed-vs-central-") as tmp:
        work = Path(tmp)
        key, pub = work / "bench.key", work / "bench.pub"
        generate_keypair(key, pub)
        for (task, source), nodes, alpha in itertools.product(args.tasks.items(),
                                                              args.node_counts, args.alphas):
            central_runs: dict[int, dict] = {}
            parts_of = {seed: node_parts(args, source, nodes, alpha, seed, spec)
                        for seed in range(args.seeds)}  # the same splits for every strategy
            for spec_name in args.strategy_specs:
                runs = []
                for seed, parts in parts_of.items():
                    x_test, y_test = union(parts, "test")
                    fed = federated(args, source, nodes, alpha, spec_name, seed, work, key)
                    fed["bundle_accuracy"] = bundle_accuracy(fed.pop("bundle"), pub, x_test,
                                                             y_test)
                    if seed not in central_runs:
                        central_runs[seed] = central(args, net, parts, spec, fed["route"], seed)
                    cen = central_runs[seed]
                    runs.append({"seed": seed, "label_skew_tv": label_skew(parts),
                                 "federated": fed, "central": cen,
                                 "gap_points": round(100 * (cen["final_accuracy"]
                                                            - fed["final_accuracy"]), 2),
                                 "bundle_gap_points": round(100 * (cen["final_accuracy"]
                                                                   - fed["bundle_accuracy"]), 2)})
                    print(f"{task} n={nodes} alpha={alpha:g} {spec_name} seed {seed}: federated "
                          f"{fed['final_accuracy']:.4f} bundle {fed['bundle_accuracy']:.4f} "
                          f"central {cen['final_accuracy']:.4f} ({fed['seconds']:.0f} s)",
                          file=sys.stderr, flush=True)
                cells.append({"task": task, "source": source, "nodes": nodes, "alpha": alpha,
                              "strategy": spec_name, "runs": runs})
                curves.setdefault((task, nodes, alpha), {})[spec_name] = [
                    {int(k): v for k, v in r["federated"]["accuracy_per_round"].items()}
                    for r in runs]
            centrals[(task, nodes, alpha)] = [r["final_accuracy"] for r in central_runs.values()]
    first = cells[0]["runs"][0]["federated"]
    per_round_subnet = first["bytes_per_round"]
    ratio = first["sdrnet_bytes"] / max(first["subnet_bytes"], 1)
    result = {
        "benchmark": "federated_vs_central",
        "in_process": True,
        "note": "federation run in-process on LocalGrid (same ServerApp flow, strategies and "
                "ClientApp handlers as the Deployment Engine, without the network); gap = "
                "central - federated accuracy in points (federated: the mean of the nodes' "
                "held-out accuracies of the final model, under FedBN with each node's own "
                "BatchNorm; bundle: the saved bundle on the union of held-out splits)",
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("out", "report", "task", "set")},
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "targets": {"alpha_0.5_gap_points": 2.0, "alpha_0.1_gap_points": 5.0,
                    "last3_swing_points": 2.0},
        "bytes_per_round": {"counts": "model to every node for training, weights back, model "
                                      "to every node for evaluation (array payload bytes)",
                            "subnet": per_round_subnet,
                            "whole_sdrnet_estimate": int(per_round_subnet * ratio),
                            "ratio": round(ratio, 2),
                            "subnet_model_bytes": first["subnet_bytes"],
                            "sdrnet_model_bytes": first["sdrnet_bytes"]},
        "summary": summarise(cells),
        "cells": cells,
        "seconds": round(time.time() - started, 1),
    }
    if args.report:
        write_report(args.report, result, curves, centrals)
        result["report"] = str(args.report / "index.html")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
