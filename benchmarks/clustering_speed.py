"""Residual k-means speed: faiss-cpu against scikit-learn on synthetic embeddings.

Prints JSON: best-of-`repeats` wall and CPU seconds of `fit_residual_kmeans` (4 levels x 4
clusters, at most 25 Lloyd iterations, same greedy k-means++ seeds, no subsampling) per backend
and size, the iterations run, the final residual energy (both reach the same quality), and an
extrapolation to ImageNet with ResNet-50 features (1.28 M x 2048): a Lloyd iteration costs
O(N*D) for a fixed number of clusters, so seconds per (million N*D x iteration) at the largest
sizes carry over. Memory is computed, not measured (float32 input and residual, plus
scikit-learn's centred copy). On a machine shared with other jobs, use --threads 1 and read
the CPU seconds.

    nice .venv/bin/python benchmarks/clustering_speed.py [--quick] [--threads 1] [--sizes NxD,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sdr_edge.clustering import fit_residual_kmeans

IMAGENET = (1_281_167, 2048)
BRANCHING = (4, 4, 4, 4)


def synthetic(n: int, d: int, seed: int = 0, centers: int = 256) -> np.ndarray:
    """A Gaussian mixture: clustered like real embeddings, not uniform noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, d)).astype(np.float32)
    x = rng.normal(scale=0.7, size=(n, d)).astype(np.float32)
    x += means[rng.integers(0, centers, size=n)]
    return x


def time_fit(x: np.ndarray, backend: str, repeats: int, iters: int, threads: int) -> dict:
    """Best and median wall seconds, best process CPU seconds, quality and Lloyd iterations.

    CPU seconds barely move when other jobs share the cores (wall seconds do), so with
    --threads 1 they are the fair figure on a busy machine.
    """
    walls, cpus, energy, iterations = [], [], None, None
    for rep in range(repeats):
        with thread_limit(threads):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fit_residual_kmeans(x, BRANCHING, iters=iters, seed=rep, backend=backend)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        energy, iterations = result.residual_energy[-1], result.iterations
    return {"best_s": round(min(walls), 3), "median_s": round(statistics.median(walls), 3),
            "best_cpu_s": round(min(cpus), 3), "residual_energy": round(float(energy), 5),
            "iterations_per_level": iterations}


@contextmanager
def thread_limit(threads: int):
    """Cap OpenMP/BLAS threads of numpy, scikit-learn and faiss alike (0: leave the defaults)."""
    if threads <= 0:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def extrapolate(rows: list[dict], backend: str, iters: int) -> dict:
    """Seconds per (million N*D elements x Lloyd iteration) at the two largest sizes, scaled to
    ImageNet with every level running all `iters` iterations (an upper bound: runs converge).

    The slower rate of the two is used (do not flatter either backend). CPU seconds are the
    figure to trust on a shared machine; wall seconds measure the other jobs as well.
    """
    largest = sorted(rows, key=lambda r: r["n"] * r["d"])[-2:]
    n, d = IMAGENET
    out: dict = {"from_sizes": [f"{r['n']}x{r['d']}" for r in largest],
                 "lloyd_iterations_assumed": iters * len(BRANCHING)}
    for key in ("best_cpu_s", "best_s"):
        rate = max(r[backend][key] / (r["n"] * r["d"] / 1e6 * sum(r[backend]["iterations_per_level"]))
                   for r in largest)
        out[f"{key}_per_million_element_iterations"] = round(rate, 6)
        out[f"predicted_{key}"] = round(rate * n * d / 1e6 * iters * len(BRANCHING), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--sizes", default=None,
                        help="comma-separated NxD sizes, e.g. 20000x512,100000x512")
    parser.add_argument("--threads", type=int, default=0,
                        help="cap threads for both backends (0: library defaults); 1 gives "
                             "stable figures on a machine shared with other jobs")
    args = parser.parse_args()
    sizes = ([(2000, 64), (10000, 128)] if args.quick else
             [(2000, 64), (20000, 512), (50000, 512), (100000, 512), (200000, 512),
              (50000, 2048)])
    if args.sizes:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    warm = synthetic(500, 16)
    for backend in ("faiss", "sklearn"):  # imports and thread pools start outside the timings
        fit_residual_kmeans(warm, BRANCHING, iters=2, backend=backend)
    load_before = os.getloadavg()
    rows = []
    for n, d in tqdm(sizes, desc="sizes", file=sys.stderr):
        x = synthetic(n, d)
        row = {"n": n, "d": d}
        for backend in ("faiss", "sklearn"):
            row[backend] = time_fit(x, backend, repeats, args.iters, args.threads)
        row["faiss_speedup_wall"] = round(row["sklearn"]["best_s"] / row["faiss"]["best_s"], 2)
        row["faiss_speedup_cpu"] = round(row["sklearn"]["best_cpu_s"] / row["faiss"]["best_cpu_s"],
                                         2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # partial results survive a kill
        del x
    n, d = IMAGENET
    gib = n * d * 4 / 2**30
    out = {
        "benchmark": "residual_kmeans",
        "branching": list(BRANCHING), "iters": args.iters, "repeats": repeats,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "threads": args.threads,
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "sizes": rows,
        "imagenet_extrapolation": {
            "n": n, "d": d,
            "faiss": extrapolate(rows, "faiss", args.iters),
            "sklearn": extrapolate(rows, "sklearn", args.iters),
            "memory_gib": {"embeddings_float32": round(gib, 1),
                           "faiss_working_set": round(2 * gib, 1),
                           "sklearn_working_set": round(3 * gib, 1)},
        },
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
