"""Tar shards in the WebDataset layout, with an index for reads by sample index.

A shard `shard-000000.tar` holds, per sample, `KEY.EXT` (the original encoded file, not
re-encoded, so a shard pool decodes exactly what the folder pool decodes) and `KEY.cls` (the
label as text) when the folder has class sub-folders: the layout `webdataset` and its tools
read. Next to them, `index.json` (format, count, shard names, label names) and `index.npy`
(int64 rows: shard, byte offset of the member's data, byte length, label or -1) let
`ShardPool.read(indices)` fetch any sample with one `os.pread`, which is what exact resume
needs: an epoch is a seeded permutation of indices, and a streaming reader (webdataset's
`WebDataset`) only offers shard-level shuffles. The writer is stdlib `tarfile`; offsets are
read back from the finished tar (`TarInfo.offset_data`), never computed by hand.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from sdr_edge.data.folder import SourceError, decode_bytes, folder_labels, list_image_files
from sdr_edge.data.preprocess import prepare_uint8

SHARD_FORMAT = "sdr-edge-shards/1"
INDEX_JSON, INDEX_NPY = "index.json", "index.npy"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _write_shard(path: Path, samples: list[tuple[str, str, bytes, int]]) -> list[tuple[int, int]]:
    """Write one tar (KEY.EXT and KEY.cls per sample); return each image member's
    (data offset, size) read back from the closed file."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, label in samples:
            members = [(f"{key}{ext}", data)]
            if label >= 0:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, "r") as tar:
        where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    return [where[f"{key}{ext}"] for key, ext, _, _ in samples]


def write_shards(folder: str | Path, out: str | Path, shard_size: int = 1000) -> dict:
    """Pack every image file under `folder` (sorted, as FolderPool lists them) into shards of
    `shard_size` samples in `out`, staged in a sibling folder and renamed when complete.
    Files are copied byte for byte (no decode); returns the index document."""
    from sdr_edge.artifacts.staging import staged_dir

    folder = Path(folder)
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = list_image_files(folder)
    if not files:
        raise SourceError(f"no image file under {folder}")
    labels, names = folder_labels([p.relative_to(folder).parts for p in files])
    rows = np.zeros((len(files), 4), dtype=np.int64)
    rows[:, 3] = -1 if labels is None else labels
    shards: list[str] = []
    with staged_dir(out) as staging:
        for s, start in enumerate(range(0, len(files), shard_size)):
            chunk = range(start, min(start + shard_size, len(files)))
            samples = [(f"{i:09d}", files[i].suffix.lower(), files[i].read_bytes(),
                        int(rows[i, 3])) for i in chunk]
            shards.append(shard_name(s))
            where = _write_shard(staging / shards[-1], samples)
            rows[chunk.start:chunk.stop, 0] = s
            rows[chunk.start:chunk.stop, 1:3] = np.asarray(where, dtype=np.int64)
        np.save(staging / INDEX_NPY, rows, allow_pickle=False)
        doc = {"format": SHARD_FORMAT, "count": len(files), "shard_size": shard_size,
               "shards": shards, "label_names": list(names), "source": str(folder)}
        (staging / INDEX_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


class ShardPool:
    """Indexed reads from shards written by `write_shards`: `read(indices)` preads each
    member's bytes and decodes them like FolderPool. File handles open lazily per process (a
    forked DataLoader worker opens its own). `limit` keeps the seeded subset of `load_source`.
    """

    def __init__(self, root: str | Path, size: int, channels: int, *, limit: int | None = None,
                 seed: int = 0) -> None:
        from sdr_edge.data.pool import subset_index

        self.root = Path(root)
        index_json, index_npy = self.root / INDEX_JSON, self.root / INDEX_NPY
        if not index_json.is_file() or not index_npy.is_file():
            raise FileNotFoundError(f"{self.root} holds no shard index ({INDEX_JSON}, "
                                    f"{INDEX_NPY}); write one with sdr-server shards FOLDER "
                                    f"--out {self.root}")
        try:
            doc = json.loads(index_json.read_text())
            rows = np.load(index_npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.root}: unreadable shard index ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != SHARD_FORMAT:
            raise SourceError(f"{index_json}: not a shard index of sdr-edge (format "
                              f"{SHARD_FORMAT!r} expected)")
        if rows.ndim != 2 or rows.shape != (int(doc.get("count", -1)), 4):
            raise SourceError(f"{index_npy}: shape {rows.shape} does not match the "
                              f"{doc.get('count')} samples of {INDEX_JSON}")
        self.shards = [str(s) for s in doc["shards"]]
        self.rows = rows[subset_index(len(rows), limit, seed)]
        self.label_names = tuple(str(n) for n in doc.get("label_names", ()))
        self.labels = self.rows[:, 3].copy() if self.label_names else None
        self.name, self.size, self.channels = f"shards:{self.root}", int(size), int(channels)
        self.skipped: list[str] = []
        self.last_unreadable: list[str] = []
        self.decoded = 0
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getstate__(self) -> dict:  # a spawned worker opens its own file handles
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors share its offsets
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / self.shards[shard], os.O_RDONLY)
        return fd

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        self.last_unreadable = []
        for j, i in enumerate(indices):
            shard, offset, size, _ = (int(v) for v in self.rows[i])
            data = np.frombuffer(os.pread(self._fd(shard), size, offset), dtype=np.uint8)
            self.decoded += 1
            image = decode_bytes(data) if data.size == size else None
            if image is None:
                where = f"{self.root / self.shards[shard]}#{int(i)}"
                self.last_unreadable.append(where)
                if where not in self.skipped:
                    self.skipped.append(where)
                continue
            out[j] = prepare_uint8(image, self.size, self.channels)
        return out

