"""Read a folder of images with OpenCV; class sub-folders give labels, corrupt files are counted."""

from __future__ import annotations

import logging
import os
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
    return decode_bytes(data)


def decode_bytes(data: np.ndarray) -> np.ndarray | None:
    """Decode an encoded image (uint8 buffer) keeping its channels; None when it cannot."""
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


def folder_labels(rel_parts: list[tuple[str, ...]]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Labels from the first directory level below the root when every file sits in one."""
    if not rel_parts or not all(len(parts) >= 2 for parts in rel_parts):
        return None, ()
    names = tuple(sorted({parts[0] for parts in rel_parts}))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[parts[0]] for parts in rel_parts], dtype=np.int64), names


class FolderPool:
    """An image folder read on demand: the scan lists files and labels without decoding;
    `read(indices)` decodes just those files with OpenCV at size x size x channels.

    `limit` keeps a seeded subset of the file list (the rule of `load_source`) before any
    decode. Paths are held as one NumPy bytes array, not a list of str: DataLoader workers are
    forked, and touching millions of Python objects would copy their pages into every worker.
    An unreadable file reads as a black image; its path goes to `skipped` (and, for the
    DataLoader, to `last_unreadable` of the read that met it). `decoded` counts decodes in
    this process (tests check that `limit` decodes only what it keeps).
    """

    def __init__(self, root: str | Path, size: int, channels: int, *, limit: int | None = None,
                 seed: int = 0) -> None:
        from sdr_edge.data.pool import subset_index

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        files = list_image_files(self.root)
        if not files:
            raise SourceError(f"no image file ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        keep = subset_index(len(files), limit, seed)
        rel = [files[i].relative_to(self.root).parts for i in keep]
        self.labels, self.label_names = folder_labels(rel)
        self.paths = np.array([os.fsencode(os.path.join(*parts)) for parts in rel], dtype=bytes)
        self.name, self.size, self.channels = str(self.root), int(size), int(channels)
        self.skipped: list[str] = []
        self.last_unreadable: list[str] = []
        self.decoded = 0

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.paths[i])

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        self.last_unreadable = []
        for j, i in enumerate(indices):
            path = self.path(int(i))
            image = decode_image(path)
            self.decoded += 1
            if image is None:
                self._unreadable(str(path))
                continue
            out[j] = prepare_uint8(image, self.size, self.channels)
        return out

    def _unreadable(self, path: str) -> None:
        self.last_unreadable.append(path)
        if path not in self.skipped:
            log.warning("unreadable image %s: read as a black image", path)
            self.skipped.append(path)
