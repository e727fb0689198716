"""Montage of sample images per cluster: what a level-1 cluster means, at a glance.

Drawn with OpenCV on a NumPy canvas (no figure machinery): one row per cluster, a label with
the cluster's digit and size on the left, then sample images. Rows are framed by full-width
separator lines of SEPARATOR_BGR so that the layout can be checked from the PNG alone.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sdr_edge.artifacts.atomic import atomic_write_bytes

SEPARATOR_BGR = (160, 110, 40)
SEPARATOR_PX = 2
LABEL_PX = 120
HEADER_PX = 28
GAP_PX = 2
MIN_ROW_PX = 36  # two lines of label text
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    """A size x size BGR tile; small images are enlarged with hard pixel edges."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] != 3:
        raise ValueError(f"montage images need 1 or 3 channels, got {image.shape[2]}")
    grow = size >= max(image.shape[:2])
    return cv2.resize(image, (size, size),
                      interpolation=cv2.INTER_NEAREST if grow else cv2.INTER_AREA)


def row_height(tile: int) -> int:
    """Height of one cluster's row, separator excluded."""
    return max(tile + 2 * GAP_PX, MIN_ROW_PX)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.45) -> None:
    cv2.putText(canvas, text, (x, y), _FONT, scale, (30, 30, 30), 1, cv2.LINE_AA)


def montage_array(images: np.ndarray, codes_level1: np.ndarray, *, per_cluster: int = 12,
                  tile: int = 48, n_clusters: int | None = None, seed: int = 0,
                  title: str = "level-1 clusters: sample images") -> np.ndarray:
    """The montage as a BGR uint8 array (rows = clusters 0..n_clusters-1, empty ones included)."""
    images = np.asarray(images)
    codes = np.asarray(codes_level1, dtype=np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"montage images must be uint8 NHWC or NHW, got {images.dtype} "
                         f"{images.shape}")
    if len(images) != len(codes):
        raise ValueError(f"{len(images)} images but {len(codes)} codes: the montage needs the "
                         "training images in the same order as the codes")
    if len(codes) == 0 or codes.min() < 0:
        raise ValueError("montage needs at least one image and non-negative cluster codes")
    n_clusters = n_clusters or int(codes.max()) + 1
    row_h = row_height(tile)
    width = LABEL_PX + per_cluster * (tile + GAP_PX) + GAP_PX
    height = HEADER_PX + n_clusters * (row_h + SEPARATOR_PX) + SEPARATOR_PX
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    _text(canvas, f"{title} ({len(codes)} images)", 6, HEADER_PX - 9, 0.5)
    rng = np.random.default_rng(seed)
    y = HEADER_PX
    for cluster in range(n_clusters):
        canvas[y:y + SEPARATOR_PX] = SEPARATOR_BGR
        y += SEPARATOR_PX
        members = np.flatnonzero(codes == cluster)
        share = 100.0 * len(members) / len(codes)
        _text(canvas, f"cluster {cluster}", 6, y + row_h // 2 - 3)
        _text(canvas, f"n={len(members)} ({share:.1f}%)", 6, y + row_h // 2 + 13, 0.4)
        shown = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        for i, index in enumerate(shown):
            x = LABEL_PX + GAP_PX + i * (tile + GAP_PX)
            top = y + (row_h - tile) // 2
            canvas[top:top + tile, x:x + tile] = _tile(images[index], tile)
        y += row_h
    canvas[y:y + SEPARATOR_PX] = SEPARATOR_BGR
    return canvas


def cluster_montage(images: np.ndarray, codes_level1: np.ndarray, path: str | Path,
                    per_cluster: int = 12, *, tile: int = 48,
                    n_clusters: int | None = None) -> Path:
    """Write the montage PNG of `per_cluster` sample images for every level-1 cluster."""
    canvas = montage_array(images, codes_level1, per_cluster=per_cluster, tile=tile,
                           n_clusters=n_clusters)
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the montage for {path}")
    return atomic_write_bytes(path, encoded.tobytes())
