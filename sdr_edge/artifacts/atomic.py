"""Atomic file writes (temporary file, fsync, rename) and checksums.

A reader never sees half a file: either the old one or the new one. This is what lets a killed
run resume from its last checkpoint and a client never keep a half-written bundle.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Path], None],
                 keep_previous_as: Path | None = None) -> Path:
    """Call writer(tmp_path), fsync it, then rename over `path`. With `keep_previous_as`, an
    existing `path` is first renamed there (both renames are atomic: a kill leaves the old file,
    the new one, or both)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        from sdr_edge.artifacts.staging import OutputError

        raise OutputError(f"{path} is a folder; refusing to replace it with a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if keep_previous_as is not None and path.is_file():
            os.replace(path, keep_previous_as)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
