"""Training throughput of the routed SDRnet (K sub-nets, random codes) vs the unified backbone.

One step = both augmented views forward + backward through encoder, projector and predictor,
SimSiam loss, SGD update: what `sdr-server train` does per batch. Both models have the same
sub-net architecture, run in the same process on the same batch, and alternate repetitions so
machine load hits both alike. Prints JSON; the target is routed/unified >= 0.85 on 2 CPU cores.

    python benchmarks/train_throughput.py --config configs/tiny.toml
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import torch

from sdr_edge.models import Backbone, SDRnet
from sdr_edge.ssl import SimSiamHeads, simsiam_loss
from sdr_edge.training.config import load_config
from sdr_edge.training.siamese import SiameseNet, make_optimizer


def make_step(model: SiameseNet, opt: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
              codes: list[torch.Tensor] | None):
    """A training step; routed steps cycle through fresh random codes, so the per-expert
    partition sizes change from step to step as they do in training."""
    counter = itertools.count()

    def step() -> None:
        c = None if codes is None else codes[next(counter) % len(codes)]
        p1, p2, z1, z2 = model(x1, x2, c)
        loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, iters: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `iters` steps."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--batch", type=int, help="images per step (default: [ssl] batch_size)")
    ap.add_argument("--iters", type=int, default=5, help="steps per timed repetition")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions per model")
    ap.add_argument("--threads", type=int, help="torch threads (default: [train] threads or torch)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cfg = load_config(args.config)
    threads = args.threads if args.threads is not None else cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    bcfg = cfg.backbone_config()
    batch = args.batch or cfg.ssl.batch_size
    size = cfg.data.image_size
    x1 = torch.randn(batch, bcfg.in_channels, size, size, device=device)
    x2 = torch.randn(batch, bcfg.in_channels, size, size, device=device)

    def heads() -> SimSiamHeads:
        return SimSiamHeads(bcfg.feature_dim, cfg.ssl.proj_dim, cfg.ssl.pred_hidden)

    unified = SiameseNet(Backbone(bcfg), heads()).to(device)
    net = SDRnet(bcfg, cfg.routing.branching, cfg.resolved_level_stages(), cfg.routing.codes)
    for r in range(net.levels):
        net.split_level(r)
    routed = SiameseNet(net, heads()).to(device)
    limits = torch.tensor(cfg.routing.branching)
    codes = [(torch.rand(batch, len(limits)) * limits).long().to(device) for _ in range(16)]
    steps = {
        "unified": make_step(unified, make_optimizer(unified, cfg.ssl, batch), x1, x2, None),
        "routed": make_step(routed, make_optimizer(routed, cfg.ssl, batch), x1, x2, codes),
    }
    for step in steps.values():  # warm-up (allocator, oneDNN primitive caches)
        timed(step, 2)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    cpu_rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            wall, cpu = timed(step, args.iters)
            rates[name].append(batch * args.iters / wall)
            cpu_rates[name].append(batch * args.iters / cpu)
    med = {name: statistics.median(v) for name, v in rates.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_rates.items()}
    print(json.dumps({
        "config": args.config, "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "batch": batch, "image_size": size,
        "subnets": net.num_subnets, "branching": list(cfg.routing.branching),
        "backbone": bcfg.to_dict(),
        "routed_images_per_s": round(med["routed"], 1),
        "unified_images_per_s": round(med["unified"], 1),
        "ratio": round(med["routed"] / med["unified"], 3),
        "target_ratio": 0.85,
        # per CPU-second of this process: robust when other processes share the cores
        "routed_images_per_cpu_s": round(cpu_med["routed"], 1),
        "unified_images_per_cpu_s": round(cpu_med["unified"], 1),
        "cpu_ratio": round(cpu_med["routed"] / cpu_med["unified"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "routed_all_reps": [round(v, 1) for v in rates["routed"]],
        "unified_all_reps": [round(v, 1) for v in rates["unified"]],
    }, indent=2))


if __name__ == "__main__":
    main()
