"""Signed sub-net bundles, extracted from the SDRnet on first request and cached on disk.

For each route the cache holds the bundle folder (written by `write_bundle`, signed by the
server key) and `<route-id>.tar`, the transfer archive served to clients. A per-route lock
(a thread lock plus an flock, so several uvicorn workers sharing one cache also agree) makes
concurrent first requests for one route extract it once. A cached bundle left by an earlier
process is reused only after it verifies with this server's key and names this SDRnet's
sha256; otherwise it is rebuilt.

Small archives are also kept in memory (LRU, bounded) and served without a thread hop; each
use re-checks the file's (mtime, size, inode) so what is served is always what is on disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdr_edge.artifacts.atomic import atomic_write_bytes
from sdr_edge.artifacts.bundle import BundleError, verify_bundle, write_bundle
from sdr_edge.artifacts.transfer import pack_files, read_folder
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.sdrnet import SDRnet

from .route_ids import format_route_id

log = logging.getLogger(__name__)


class BundleCache:
    """Route -> path of its transfer archive, extracting and signing on first use."""

    def __init__(self, net: SDRnet, spec: InputSpec, key: Ed25519PrivateKey,
                 cache_dir: str | Path, provenance: dict, memory_bytes: int = 256 << 20,
                 inline_bytes: int = 8 << 20) -> None:
        self.net = net
        self.spec = spec
        self.key = key
        self.pubkey: Ed25519PublicKey = key.public_key()
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / ".locks").mkdir(exist_ok=True)
        self.provenance = dict(provenance)
        self._guard = threading.Lock()
        self._locks: dict[tuple[int, ...], threading.Lock] = {}
        self._ready: dict[tuple[int, ...], Path] = {}
        self.extractions = 0
        self.memory_bytes = memory_bytes
        self.inline_bytes = inline_bytes
        self._memory: OrderedDict[tuple[int, ...], tuple[tuple[int, int, int], bytes]] = \
            OrderedDict()
        self._memory_used = 0

    def bundle_dir(self, route: tuple[int, ...]) -> Path:
        return self.cache_dir / format_route_id(route)

    def archive_path(self, route: tuple[int, ...]) -> Path:
        return self.cache_dir / f"{format_route_id(route)}.tar"

    @contextmanager
    def _route_lock(self, route: tuple[int, ...]) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(route, threading.Lock())
        with lock, open(self.cache_dir / ".locks" / f"{format_route_id(route)}.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def payload(self, route: tuple[int, ...]) -> bytes | None:
        """The ready archive's bytes from memory (re-read if the file changed); None when the
        route is not ready yet or its archive is too big to hold (serve the file instead).
        Call from the event loop thread only. An archive deleted behind the registry's back
        (a cache clean-up, a full disk) is forgotten, so `archive` rebuilds it."""
        path = self._ready.get(route)
        if path is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._forget(route)
            return None
        if st.st_size > self.inline_bytes:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = self._memory.get(route)
        if hit is not None and hit[0] == stamp:
            self._memory.move_to_end(route)
            return hit[1]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._forget(route)
            return None
        if hit is not None:
            self._memory_used -= len(hit[1])
        self._memory[route] = (stamp, data)
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes and len(self._memory) > 1:
            _, (_, old) = self._memory.popitem(last=False)
            self._memory_used -= len(old)
        return data

    def _forget(self, route: tuple[int, ...]) -> None:
        """Drop a route whose archive vanished from disk (it is rebuilt on its next request)."""
        path = self._ready.pop(route, None)
        hit = self._memory.pop(route, None)
        if hit is not None:
            self._memory_used -= len(hit[1])
        if path is not None:
            log.warning("cached archive %s disappeared; rebuilding it", path.name)

    def archive(self, route: tuple[int, ...]) -> Path:
        """Path of the route's archive; route must already be validated against the branching."""
        ready = self._ready.get(route)
        if ready is not None and ready.is_file():
            return ready
        with self._route_lock(route):
            ready = self._ready.get(route)
            if ready is not None and ready.is_file():
                return ready
            folder = self.bundle_dir(route)
            if not self._reusable(folder, route):
                self._extract(route, folder)
            path = atomic_write_bytes(self.archive_path(route), pack_files(read_folder(folder)))
            self._ready[route] = path
            return path

    def _reusable(self, folder: Path, route: tuple[int, ...]) -> bool:
        if not folder.is_dir():
            return False
        try:
            manifest = verify_bundle(folder, self.pubkey)
        except BundleError as exc:
            log.warning("cached bundle %s is not valid (%s); rebuilding", folder.name, exc)
            return False
        prov = manifest.get("provenance", {})
        return (tuple(manifest.get("route", ())) == route
                and prov.get("sdrnet_sha256") == self.provenance.get("sdrnet_sha256"))

    def _extract(self, route: tuple[int, ...], folder: Path) -> None:
        backbone = self.net.extract(route).eval()
        model = SubnetModel(backbone, None).eval()
        write_bundle(model, folder, route, self.spec, self.key,
                     provenance={**self.provenance, "route_id": format_route_id(route)})
        self.extractions += 1
        log.info("extracted and signed sub-net %s", format_route_id(route))
