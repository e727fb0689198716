"""Pick one of the top-M signature candidates on the device, by the features it gives locally.

The registry's signature route is label-free and costs one download. A device that can afford
M downloads may instead fetch the top M (every bundle verified in memory, nothing written yet),
run each on its own images and keep the one that RankMe or the consensus score (no labels) or
LogME / kNN / the CV probe (a few labels: a folder with one sub-folder per class) scores best;
`sdr_edge.routing.rerank_eval` measures what that buys. Needs torch: the candidates run as PyTorch sub-nets, which a device install
(`pip install sdr-edge`, ONNX Runtime only) lacks; importing this module there raises an
ImportError that names the extra to install (`RERANK_EXTRA`), before anything is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.transferability import LABELLED_METHODS, RERANK_METHODS, score_candidates

RERANK_EXTRA = "sdr-edge[rerank]"
# What running and scoring a candidate imports beyond a device install (bundle loading,
# safetensors weights, feature extraction with torch, sklearn-based probes).
RERANK_MODULES = ("torch", "safetensors", "sklearn", "threadpoolctl")


class RerankError(SdrEdgeError, ValueError):
    """Re-ranking cannot run on what it was given (method, candidates, image size)."""


def missing_rerank_modules() -> list[str]:
    """The modules re-ranking needs that this interpreter cannot import."""
    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a finder refused it, or a broken stub module
            return True

    return [name for name in RERANK_MODULES if missing(name)]


if _missing := missing_rerank_modules():  # fail at import, not after M downloads
    raise ImportError(f"--rerank runs the candidates with PyTorch and needs "
                      f"{', '.join(_missing)} (not in a device install): "
                      f"pip install '{RERANK_EXTRA}'")


@dataclass(frozen=True)
class RerankChoice:
    """The index of the winning candidate, every candidate's score, and the device seconds."""

    index: int
    scores: tuple[float, ...]
    seconds: float


def rerank_bundles(bundles: Sequence[dict[str, bytes]], pubkey, images: np.ndarray,
                   method: str, labels: np.ndarray | None = None,
                   batch_size: int = 256) -> RerankChoice:
    """Verify each bundle's files, extract features on `images` (N x H x W x C uint8 at the
    bundles' input size) and return the best-scored one (ties: the earlier, i.e. better-routed)."""
    from sdr_edge.artifacts.bundle import bundle_from_files
    from sdr_edge.routing.probe import extract_features

    if method not in RERANK_METHODS:
        raise RerankError(f"unknown re-ranking method {method!r} ({', '.join(RERANK_METHODS)})")
    if not bundles:
        raise RerankError("no candidate bundles to re-rank")
    t0 = time.perf_counter()
    features = []
    for files in bundles:
        bundle = bundle_from_files(files, pubkey)
        spec = bundle.input_spec
        if images.shape[1:] != (spec.image_size, spec.image_size, spec.channels):
            raise RerankError(f"images are {images.shape[1:]}, the sub-net wants "
                             f"{spec.image_size}x{spec.image_size}x{spec.channels}")
        features.append(extract_features(bundle.model.backbone, images, spec, batch_size))
    scores = score_candidates(method, features, labels)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return RerankChoice(best, tuple(scores), time.perf_counter() - t0)


def needs_labels(method: str) -> bool:
    """Whether `method` scores candidates against labels (all but RankMe)."""
    return method in LABELLED_METHODS


def candidates_input_shape(candidates: Sequence[tuple[tuple[int, ...], dict[str, bytes]]]
                           ) -> tuple[int, int]:
    """(image size, channels) the downloaded candidates take, from the first one's manifest
    (`registry_client.fetch_candidates` verified every one; they come from one SDRnet)."""
    spec = json.loads(candidates[0][1]["manifest.json"])["input_spec"]
    return int(spec["image_size"]), int(spec["channels"])


def pick_candidate(candidates: Sequence[tuple[tuple[int, ...], dict[str, bytes]]], pubkey,
                   images: np.ndarray, method: str, labels: np.ndarray | None = None
                   ) -> tuple[tuple[int, ...], dict[str, bytes], RerankChoice]:
    """The best-scored of `fetch_candidates`' (route, files): its route, its files, the scores."""
    choice = rerank_bundles([files for _, files in candidates], pubkey, images, method,
                            labels if needs_labels(method) else None)
    route, files = candidates[choice.index]
    return route, files, choice
