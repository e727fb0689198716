"""Read a folder of images with OpenCV; class sub-folders give labels, corrupt files are counted."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sdr_edge.data.preprocess import prepare_uint8
from sdr_edge.errors import SdrEdgeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class SourceError(SdrEdgeError, ValueError):
    """A data source is malformed, unknown or holds no usable image (one line for the user)."""


@dataclass
class FolderScan:
    """Images that decoded, their labels, and the files that did not decode."""

    images: np.ndarray
    labels: np.ndarray | None
    label_names: tuple[str, ...]
    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)


def list_image_files(root: Path) -> list[Path]:
    """Every image file under root (recursively), sorted for reproducibility."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own `[ERROR:0@...]` lines while decoding: a truncated file is counted
    and reported once by us (log warning, metrics), not once per file by the codec on stderr."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


def decode_image(path: Path) -> np.ndarray | None:
    """Decode an image keeping its channels (gray stays gray); None when it cannot be read."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    with quiet_opencv():
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        return None
    if image.dtype != np.uint8:  # 16-bit PNGs and the like
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    return image


def scan_folder(root: str | Path, size: int, channels: int) -> FolderScan:
    """Load every readable image under root at size x size x channels.

    Labels come from the first directory level below root when every image sits in one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = list_image_files(root)
    images, kept, skipped = [], [], []
    for path in files:
        image = decode_image(path)
        if image is None:
            skipped.append(path)
            continue
        images.append(prepare_uint8(image, size, channels))
        kept.append(path)
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", len(skipped), root)
    if not images:
        raise SourceError(f"no readable image under {root} ({len(skipped)} unreadable file(s))")
    rel = [p.relative_to(root).parts for p in kept]
    labels, names = None, ()
    if all(len(parts) >= 2 for parts in rel):
        names = tuple(sorted({parts[0] for parts in rel}))
        index = {n: i for i, n in enumerate(names)}
        labels = np.asarray([index[parts[0]] for parts in rel], dtype=np.int64)
    return FolderScan(np.stack(images), labels, names, kept, skipped)
