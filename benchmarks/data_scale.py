"""Data-path figures at scale (issue 13): streamed folder and shard pools on 20k and 100k JPEGs.

    .venv/bin/python benchmarks/data_scale.py            # generates the folders once, then measures

Makes JPEG folders of N = 20,000 and 100,000 Fashion-MNIST images at 96 px with a random colour
per image (tint and background; the 100k folder cycles the 70k images with new colours), one
sub-folder per class, cached under runs/data_scale/ (gitignored), plus shards of the 20k folder.
Then, each in its own subprocess so peak RSS is that run's alone:

- peak RSS of phase-0 training for a fixed number of steps from each folder (the pool holds all
  N files, the steps read a seeded subset of them): target rss_100k / rss_20k <= 1.2;
- loader throughput (images/s decoded by `iter_batches`) with 0, 1, 2 workers against the
  training step's own consumption (images/s of the step on pre-decoded batches);
- the data-wait fraction of `train_epoch` with the best worker count: target <= 10 %;
- folder vs shards images/s (random-order indexed reads, 0 workers).

Prints one JSON object (also written to runs/data_scale/result.json) with os.getloadavg():
this machine (2 cores) is shared, so absolute rates move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "data_scale"
SIZE = 96
SIZES = (20_000, 100_000)
BATCH = 64
STEPS = 12
LOADER_BATCHES = 24


def _write_part(args: tuple[Path, int, int, int]) -> int:
    """Write images [start, stop) of an N-image folder (one process of the generator)."""
    import cv2

    from sdr_edge.data.sources import FASHION_MNIST_LABELS, load_fashion_mnist

    root, start, stop, seed = args
    raw, labels = load_fashion_mnist("all")
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        j = i % len(raw)
        gray = cv2.resize(raw[j], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        alpha = gray.astype(np.float32)[:, :, None] / 255.0
        tint, back = rng.uniform(60, 255, 3), rng.uniform(0, 120, 3)
        image = (alpha * tint + (1 - alpha) * back).clip(0, 255).astype(np.uint8)
        name = FASHION_MNIST_LABELS[int(labels[j])].replace("/", "-").replace(" ", "_")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return stop - start


def make_folder(n: int, processes: int = 2) -> Path:
    """The cached N-image folder (written once; a `.complete` marker says it is whole)."""
    from multiprocessing import Pool

    root = CACHE / f"fmnist96_{n}"
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(n):
        return root
    root.mkdir(parents=True, exist_ok=True)
    step = -(-n // (processes * 8))
    parts = [(root, s, min(s + step, n), 13) for s in range(0, n, step)]
    t0 = time.perf_counter()
    with Pool(processes) as pool:
        done = sum(pool.map(_write_part, parts))
    marker.write_text(f"{n}\n")
    print(f"wrote {done} JPEGs to {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root


def make_shards(folder: Path) -> Path:
    from sdr_edge.data.shards import INDEX_JSON, write_shards

    out = CACHE / f"shards_{folder.name}"
    if not (out / INDEX_JSON).is_file():
        write_shards(folder, out, shard_size=1000)
    return out


def _model_and_plan(source: str, workers: int, steps: int):
    import torch

    from sdr_edge.data.pool import channel_stats, open_pool
    from sdr_edge.data.preprocess import InputSpec
    from sdr_edge.models.resnet import Backbone
    from sdr_edge.ssl.heads import SimSiamHeads
    from sdr_edge.training.config import config_from_dict
    from sdr_edge.training.epochs import EpochPlan
    from sdr_edge.training.pipeline import split_indices
    from sdr_edge.training.siamese import SiameseNet, make_optimizer

    cfg = config_from_dict({
        "data": {"source": source, "image_size": SIZE, "channels": 3, "workers": workers},
        "model": {"preset": "small", "widths": [16, 32, 64, 64], "blocks": [1, 1, 1, 1],
                  "stem_width": 16},
        "ssl": {"proj_dim": 64, "pred_hidden": 16, "batch_size": BATCH}})
    torch.manual_seed(0)
    pool = open_pool(cfg.data, 0)
    train, _ = split_indices(len(pool), pool.labels is not None, 0.01, 0)
    mean, std = channel_stats(pool, train, max_images=2000)
    spec = InputSpec(SIZE, 3, mean, std, pool.label_names)
    subset = np.sort(np.random.default_rng(1).choice(train, steps * BATCH, replace=False))
    plan = EpochPlan(pool, subset, spec, BATCH, 0, 0, cfg.augment.to_augment_config(),
                     workers=workers)
    bcfg = cfg.backbone_config()
    model = SiameseNet(Backbone(bcfg), SimSiamHeads(bcfg.feature_dim, 64, 16))
    return pool, plan, model, make_optimizer(model, cfg.ssl, BATCH), cfg


def child_train(source: str, workers: int, steps: int) -> dict:
    """Phase-0 steps from a streamed pool (one process): peak RSS, images/s, data wait."""
    import torch

    from sdr_edge.training.distributed import DistEnv
    from sdr_edge.training.epochs import train_epoch

    torch.set_num_threads(1)
    pool, plan, model, opt, _ = _model_and_plan(source, workers, steps)
    stats = train_epoch(model, opt, plan, 0, 1, 0.05, DistEnv())
    return {"images": len(pool), "steps": stats["steps"], "images_per_s": stats["images_per_s"],
            "data_wait": stats["data_wait"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_loader(source: str, workers: int) -> dict:
    """Images/s of `iter_batches` alone, random order, LOADER_BATCHES batches."""
    from sdr_edge.data.pool import iter_batches, open_pool
    from sdr_edge.training.config import DataConfig

    pool = open_pool(DataConfig(source=source, image_size=SIZE, channels=3), 0)
    idx = np.random.default_rng(2).permutation(len(pool))[:LOADER_BATCHES * BATCH]
    t0 = time.perf_counter()
    n = sum(len(i) for i, _ in iter_batches(pool, idx, BATCH, workers=workers))
    return {"workers": workers, "images_per_s": n / (time.perf_counter() - t0)}


def child_step(source: str) -> dict:
    """Images/s the training step consumes when batches cost nothing (pre-decoded)."""
    import torch

    from sdr_edge.ssl.losses import simsiam_loss
    from sdr_edge.training.epochs import make_views

    torch.set_num_threads(1)
    pool, plan, model, opt, _ = _model_and_plan(source, 0, 4)
    batch = torch.from_numpy(pool.read(plan.train_index[:BATCH]))
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        x1, x2 = make_views(plan, batch, g, torch.device("cpu"))
        p1, p2, z1, z2 = model(x1, x2, None)
        loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"images_per_s": BATCH / float(np.median(times[1:]))}


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "train":
            out = child_train(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "loader":
            out = child_loader(rest[0], int(rest[1]))
        else:
            out = child_step(rest[0])
        print(json.dumps(out))
        return
    load_before = os.getloadavg()
    folders = {n: make_folder(n) for n in SIZES}
    shards = make_shards(folders[SIZES[0]])
    if args.generate_only:
        return
    small, large = (str(folders[n]) for n in SIZES)
    loader = [_child("loader", small, str(w)) for w in (0, 1, 2)]
    best = max(loader, key=lambda r: r["images_per_s"])["workers"]
    step = _child("step", small)
    rss = {str(n): _child("train", str(folders[n]), "0", str(STEPS)) for n in SIZES}
    wait = _child("train", large, str(best), str(STEPS))
    shard = _child("loader", f"shards:{shards}", "0")
    result = {
        "benchmark": "data_scale", "image_size": SIZE, "batch": BATCH, "steps": STEPS,
        "peak_rss": rss,
        "rss_ratio_100k_20k": rss[str(SIZES[1])]["peak_rss_mb"] / rss[str(SIZES[0])]["peak_rss_mb"],
        "loader_images_per_s": {str(r["workers"]): r["images_per_s"] for r in loader},
        "step_consumes_images_per_s": step["images_per_s"],
        "best_workers": best, "train_with_best_workers": wait,
        "data_wait_fraction_best": wait["data_wait"],
        "folder_vs_shards_images_per_s": {"folder": loader[0]["images_per_s"],
                                          "shards": shard["images_per_s"]},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "note": "2-core machine shared with other jobs: rates move with the load",
    }
    (CACHE / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
