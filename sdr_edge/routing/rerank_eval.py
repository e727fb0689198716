"""What each routing option buys and costs: the signature route vs device-side re-ranking.

For one labelled task and one SDRnet run, the task's train split plays the device's local images.
The signature (kit only, label-free) ranks all sub-nets; the device may then download the top M
and re-rank them by the features they give on its own images: RankMe or the consensus score
(label-free) or, with a few labels per class, LogME, leave-one-out kNN or the CV probe (`sdr_edge.routing.transferability`). Every option
is judged by the same yardstick, the linear-probe test accuracy of the sub-net it picks, against
the best of the M candidates (regret) and against random routes (routed − random). Cost is what
the device pays: bytes downloaded (M bundles instead of one) and seconds of feature extraction
and scoring on its images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from safetensors.torch import save
from torch import nn

from sdr_edge.artifacts.run_dir import KIT_DIR, load_sdrnet
from sdr_edge.data.sources import load_source
from sdr_edge.routing.evaluate import random_control_routes, split_task
from sdr_edge.routing.kit_runtime import KitRunner, compute_signature
from sdr_edge.routing.probe import extract_features, linear_probe_accuracy
from sdr_edge.routing.signature import Route, score_routes
from sdr_edge.routing.transferability import LABEL_FREE_METHODS, score_candidates

OPTIONS = ("signature", "rankme", "consensus", "logme", "knn", "probe")


def weights_nbytes(backbone: nn.Module) -> int:
    """Bytes of a sub-net's weights as a bundle carries them (safetensors)."""
    return len(save({k: v.contiguous() for k, v in backbone.state_dict().items()}))


def few_labels(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most `per_class` images of every class (seeded): the device's few labels."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def evaluate_rerank(run_dir: str | Path, task_source: str, *, top_m: int = 8,
                    random_routes: int = 8, labels_per_class: int = 10,
                    image_limit: int | None = None, test_fraction: float = 0.3,
                    seed: int = 0, batch_size: int = 256) -> dict:
    """Regret, routed − random and device cost of every option in OPTIONS on one task."""
    run_dir = Path(run_dir)
    net, spec = load_sdrnet(run_dir)
    runner = KitRunner(run_dir / KIT_DIR)
    source = load_source(task_source, spec.image_size, spec.channels, limit=image_limit, seed=seed)
    tr, te = split_task(source, test_fraction, seed)
    x_tr, x_te, y_tr, y_te = source.images[tr], source.images[te], source.labels[tr], source.labels[te]
    t0 = time.perf_counter()
    sig = compute_signature(runner, x_tr, batch_size=batch_size)
    signature_seconds = time.perf_counter() - t0
    scored = [route for route, _ in score_routes(sig)]
    candidates = scored[:top_m]
    # The bench's control: uniform over every route but the routed one (top-M ones included),
    # so routed − random means the same here as in `sdr-server bench`.
    randoms = random_control_routes(net.branching, candidates[0], random_routes, seed)
    labelled = few_labels(y_tr, labels_per_class, seed)

    probe: dict[Route, float] = {}
    features: dict[Route, np.ndarray] = {}
    extract_seconds = 0.0
    bundle_bytes = []
    for route in dict.fromkeys(candidates + randoms):
        backbone = net.extract(route).eval()
        t0 = time.perf_counter()
        f_tr = extract_features(backbone, x_tr, spec, batch_size)
        extract_s = time.perf_counter() - t0
        probe[route] = linear_probe_accuracy(f_tr, y_tr, extract_features(backbone, x_te, spec,
                                                                          batch_size), y_te,
                                             seed=seed)
        if route in candidates:
            features[route] = f_tr
            extract_seconds += extract_s
            bundle_bytes.append(weights_nbytes(backbone))

    option_scores: dict[str, dict[Route, float]] = {}
    seconds: dict[str, float] = {}
    for method in OPTIONS[1:]:
        t0 = time.perf_counter()
        unlabelled = method in LABEL_FREE_METHODS
        feats = [features[r] if unlabelled else features[r][labelled] for r in candidates]
        values = score_candidates(method, feats, None if unlabelled else y_tr[labelled])
        option_scores[method] = dict(zip(candidates, values, strict=True))
        seconds[method] = extract_seconds + time.perf_counter() - t0

    best = max(probe[r] for r in candidates)
    random_mean = float(np.mean([probe[r] for r in randoms])) if randoms else float("nan")
    one_bundle = int(np.mean(bundle_bytes))
    options = {"signature": {"route": list(candidates[0]), "probe": probe[candidates[0]],
                             "bytes": one_bundle, "device_seconds": signature_seconds}}
    for method, scores in option_scores.items():
        pick = max(candidates, key=lambda r: (scores[r], -candidates.index(r)))
        options[method] = {"route": list(pick), "probe": probe[pick],
                           "bytes": one_bundle * len(candidates),
                           "device_seconds": signature_seconds + seconds[method]}
    for row in options.values():
        row["regret_points"] = 100.0 * (best - row["probe"])
        row["minus_random_points"] = 100.0 * (row["probe"] - random_mean)
    return {
        "run": str(run_dir), "task": task_source, "seed": seed, "top_m": len(candidates),
        "random_routes": len(randoms), "labels_per_class": labels_per_class,
        "labelled_images": int(len(labelled)), "train_images": int(len(tr)),
        "test_images": int(len(te)), "best_of_top_m_probe": best,
        "random_mean_probe": random_mean, "options": options,
        "candidates": [{"route": list(r), "signature_rank": i + 1, "probe": probe[r],
                        **{m: option_scores[m][r] for m in option_scores}}
                       for i, r in enumerate(candidates)],
    }
