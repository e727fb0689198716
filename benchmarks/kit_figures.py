"""Signature-kit figures: latency per image on one CPU thread, and agreement with the teacher.

Latency: ONNX Runtime with intra_op_num_threads=1, one image per call (median and p90 over
`--repeats` calls, after warm-up), plus the per-image cost in batches of 64 including the
preprocessing (`normalize_batch`). Agreement: the kit's argmax digit per level against the
teacher's codes for images the kit never trained on (`assign_codes` of the L2-normalised
teacher embeddings under the run's codebooks, exactly how training assigned codes).

    nice .venv/bin/python benchmarks/kit_figures.py --run RUN_DIR [--source fashion-mnist:test]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sdr_edge.artifacts.run_dir import KIT_DIR, codebook_kind, load_codebooks, load_teacher
from sdr_edge.clustering import assign_codes, assign_tree_codes
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.routing.kit_runtime import KitRunner
from sdr_edge.routing.probe import extract_features


def latency(runner: KitRunner, images: np.ndarray, repeats: int) -> dict:
    one = normalize_batch(images[:1], runner.spec)
    for _ in range(20):
        runner.probabilities(one)
    times = []
    for i in range(repeats):
        x = normalize_batch(images[i % len(images):i % len(images) + 1], runner.spec)
        t0 = time.perf_counter()
        runner.probabilities(x)
        times.append(time.perf_counter() - t0)
    batch = images[:64]
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        runner.probabilities(normalize_batch(batch, runner.spec))
    per_image_batched = (time.perf_counter() - t0) / (reps * len(batch))
    times.sort()
    return {"latency_ms_batch1_median": round(1e3 * statistics.median(times), 4),
            "latency_ms_batch1_p90": round(1e3 * times[int(0.9 * len(times))], 4),
            "ms_per_image_batch64_with_preprocessing": round(1e3 * per_image_batched, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--source", default="fashion-mnist:test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--repeats", type=int, default=500)
    args = p.parse_args(argv)

    runner = KitRunner(args.run / KIT_DIR, threads=1)
    teacher, spec = load_teacher(args.run)
    src = load_source(args.source, spec.image_size, spec.channels, limit=args.limit)
    emb = extract_features(teacher, src.images, spec)
    assign = assign_tree_codes if codebook_kind(args.run) == "tree" else assign_codes
    codes = assign(emb, [c.numpy() for c in load_codebooks(args.run)])
    preds = []
    for start in range(0, len(src), 512):
        levels = runner.probabilities(normalize_batch(src.images[start:start + 512], runner.spec))
        preds.append(np.stack([lv.argmax(1) for lv in levels], axis=1))
    pred = np.concatenate(preds)
    agree = {f"agreement_level{r + 1}": round(float((pred[:, r] == codes[:, r]).mean()), 4)
             for r in range(codes.shape[1])}
    agree["agreement_all_levels"] = round(float((pred == codes).all(axis=1).mean()), 4)
    majority = {f"majority_level{r + 1}": round(float(np.bincount(codes[:, r]).max() / len(codes)),
                                                4) for r in range(codes.shape[1])}
    out = {"benchmark": "kit_figures", "run": str(args.run), "source": args.source,
           "images": len(src), "cpu": platform.processor() or platform.machine(),
           "kit_onnx_bytes": (args.run / KIT_DIR / "kit.onnx").stat().st_size,
           "kit_params": runner.info.get("metrics", {}).get("kit_params"),
           "heldout_train_split_metrics": {k: v for k, v in runner.info.get("metrics", {}).items()
                                           if k.startswith("agreement")},
           **agree, **majority, **latency(runner, src.images, args.repeats)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
