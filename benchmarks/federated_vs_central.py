"""Federated fine-tuning vs centralised fine-tuning of the same routed sub-net; bytes per round.

Federated: the ServerApp's own flow (`run_federation`: signature query, routing by the
aggregated signature, FedAvg/FedProx, evaluation on every node's held-out split) over N nodes
holding IID (or Dirichlet-alpha) partitions. It runs IN-PROCESS on `LocalGrid` (the ClientApp
handlers called directly, no SuperLink and no network) so a sweep takes seconds; the messages,
strategy and train/eval code are the ones the Deployment Engine runs (tests/test_federation_*).

Central: the same sub-net with the same initial head, trained with the same local recipe on the
union of the nodes' training splits for rounds x local-epochs epochs, evaluated on the union of
their held-out splits. Target: federated within 2 accuracy points of central on IID partitions.

Bytes: what one round moves with the sub-net (model down to each node + weights back) against
what shipping the whole SDRnet would cost.

    python benchmarks/federated_vs_central.py --run-dir runs/tiny --rounds 10 --seeds 3
Prints one JSON object (also written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.client_app import app  # noqa: E402
from sdr_edge.artifacts.run_dir import load_sdrnet  # noqa: E402
from sdr_edge.artifacts.signing import generate_keypair  # noqa: E402
from sdr_edge.data.sources import ImageSource  # noqa: E402
from sdr_edge.federated.app_config import FederationConfig  # noqa: E402
from sdr_edge.federated.local import LocalTrainConfig, evaluate_local, train_local  # noqa: E402
from sdr_edge.federated.local_grid import LocalGrid, server_identity  # noqa: E402
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data  # noqa: E402
from sdr_edge.federated.server_flow import run_federation  # noqa: E402
from sdr_edge.models.classifier import SubnetModel  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished sdr-server train run")
    p.add_argument("--data", default="builtin:digits", help="source the nodes partition")
    p.add_argument("--limit", type=int, default=0, help="seeded subset of the source first")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.0, help="Dirichlet alpha; 0: IID")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=LocalTrainConfig.lr)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fine-tune", default="full", choices=("full", "linear"))
    p.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox"))
    p.add_argument("--proximal-mu", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=3, help="repeat with partition/init seeds 0..n-1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p.parse_args()


def union(parts: list[ImageSource]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]))  # type: ignore[misc]


def node_configs(args: argparse.Namespace, seed: int, kit_dir: Path) -> list[dict]:
    return [{"data": args.data, "partition-id": i, "num-partitions": args.nodes,
             "alpha": args.alpha, "partition-seed": seed, "limit": args.limit,
             "kit-dir": str(kit_dir)} for i in range(args.nodes)]


def federated(args, seed: int, work: Path, key: Path) -> dict:
    cfg = FederationConfig.from_run_config({
        "run-dir": str(args.run_dir), "signing-key": str(key), "out-dir": str(work / f"fed{seed}"),
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "lr": args.lr,
        "batch-size": args.batch_size, "fine-tune": args.fine_tune, "strategy": args.strategy,
        "proximal-mu": args.proximal_mu, "min-nodes": args.nodes, "min-round-nodes": args.nodes,
        "seed": seed})
    nodes = node_configs(args, seed, args.run_dir / "kit")
    started = time.perf_counter()
    with server_identity():
        summary = run_federation(LocalGrid(app, nodes), cfg)
    seconds = time.perf_counter() - started
    rows = json.loads((work / f"fed{seed}" / "summary.json").read_text())["rounds"]
    trained = [r for r in rows if r["round"] >= 1]
    return {"route": summary["route"], "final_accuracy": summary["final_accuracy"],
            "accuracy_per_round": {r["round"]: round(r["eval-accuracy"], 4) for r in rows},
            "bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in trained])),
            "subnet_bytes": summary["subnet_bytes"], "sdrnet_bytes": summary["sdrnet_bytes"],
            "seconds": round(seconds, 2)}


def central(args, seed: int, route: list[int]) -> dict:
    net, spec = load_sdrnet(args.run_dir)
    backbone = net.extract(route).eval()
    cfg = NodeDataConfig  # every node's split, exactly as the nodes load them
    parts = [load_node_data(cfg(args.data, i, args.nodes, args.alpha, seed,
                                args.limit or None), spec.image_size, spec.channels)
             for i in range(args.nodes)]
    num_classes = parts[0].num_classes
    torch.manual_seed(seed)  # same head initialisation as run_federation
    model = SubnetModel(backbone, num_classes)
    x_train, y_train = union([p.train for p in parts])
    x_test, y_test = union([p.test for p in parts])
    started = time.perf_counter()
    train_local(model, x_train, y_train, spec, LocalTrainConfig(
        epochs=args.rounds * args.local_epochs, lr=args.lr, batch_size=args.batch_size,
        mode=args.fine_tune, seed=seed), progress="central")
    result = evaluate_local(model, x_test, y_test, spec)
    return {"final_accuracy": result.accuracy, "train_images": int(len(y_train)),
            "test_images": int(len(y_test)), "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # keep stdout for the JSON
    runs = []
    with tempfile.TemporaryDirectory(prefix="fed-vs-central-") as tmp:
        work = Path(tmp)
        key = work / "bench.key"
        generate_keypair(key, work / "bench.pub")
        for seed in range(args.seeds):
            fed = federated(args, seed, work, key)
            cen = central(args, seed, fed["route"])
            runs.append({"seed": seed, "federated": fed, "central": cen,
                         "gap_points": round(100 * (cen["final_accuracy"]
                                                    - fed["final_accuracy"]), 2)})
            print(f"seed {seed}: federated {fed['final_accuracy']:.4f}  central "
                  f"{cen['final_accuracy']:.4f}", file=sys.stderr)
    fed_acc = [r["federated"]["final_accuracy"] for r in runs]
    cen_acc = [r["central"]["final_accuracy"] for r in runs]
    first = runs[0]["federated"]
    per_round_subnet = first["bytes_per_round"]
    per_round_sdrnet = (per_round_subnet // max(first["subnet_bytes"], 1)) * first["sdrnet_bytes"]
    gap = 100 * (float(np.mean(cen_acc)) - float(np.mean(fed_acc)))
    report = {
        "benchmark": "federated_vs_central",
        "in_process": True,
        "note": "federation run in-process on LocalGrid (same ServerApp flow, strategy and "
                "ClientApp handlers as the Deployment Engine, without the network)",
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k != "out"},
        "partition": "iid" if args.alpha <= 0 else f"dirichlet(alpha={args.alpha})",
        "federated_accuracy_mean": round(float(np.mean(fed_acc)), 4),
        "central_accuracy_mean": round(float(np.mean(cen_acc)), 4),
        "gap_points_mean": round(gap, 2),
        "target_points": 2.0,
        "within_target": bool(gap <= 2.0),
        "bytes_per_round": {"counts": "model to every node for training, weights back, model to "
                                      "every node for evaluation (array payload bytes)",
                            "subnet": per_round_subnet, "whole_sdrnet": per_round_sdrnet,
                            "ratio": round(per_round_sdrnet / max(per_round_subnet, 1), 2),
                            "subnet_model_bytes": first["subnet_bytes"],
                            "sdrnet_model_bytes": first["sdrnet_bytes"]},
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
