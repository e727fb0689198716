"""Moving a folder of signed files over the network: an uncompressed tar read only in memory.

Bundles and signature kits travel as a plain tar of their top-level files. The receiver parses
the archive in memory, accepts nothing but regular files with plain names (no paths, links,
devices, duplicates), checks the Ed25519 signature and every checksum, and only then writes the
files to a staging folder that is renamed into place. A refused archive leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdr_edge.artifacts.atomic import atomic_replace_dir, sha256_bytes
from sdr_edge.artifacts.signing import sign

# Same names as sdr_edge.artifacts.bundle, which imports torch: this module must not, because
# a device fetches and verifies the signature kit without it (a test keeps these equal).
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
KIT_FORMAT = "sdr-edge-kit"
KIT_VERSION = 1
TAR_MEDIA_TYPE = "application/x-tar"
MAX_FILES = 64
MAX_ARCHIVE_BYTES = 2 << 30
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TransferError(ValueError):
    """An archive is malformed, unsafe, unsigned or does not verify."""


def is_plain_name(name: str) -> bool:
    """A single file name: no separators, no '..', no leading dot, no odd characters."""
    return bool(_PLAIN_NAME.match(name)) and ".." not in name


def read_folder(folder: str | Path) -> dict[str, bytes]:
    """The regular top-level files of a folder (what an archive of it carries)."""
    folder = Path(folder)
    files: dict[str, bytes] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink() and is_plain_name(path.name):
            files[path.name] = path.read_bytes()
    return files


def pack_files(files: dict[str, bytes]) -> bytes:
    """Deterministic uncompressed tar of plain-named files (fixed mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            if not is_plain_name(name):
                raise TransferError(f"refusing to pack file name {name!r}")
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def unpack_files(data: bytes, max_files: int = MAX_FILES,
                 max_bytes: int = MAX_ARCHIVE_BYTES) -> dict[str, bytes]:
    """Parse a tar in memory; refuse anything but a few regular files with plain names."""
    if len(data) > max_bytes:
        raise TransferError(f"archive is {len(data)} bytes, over the limit of {max_bytes}")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    raise TransferError(f"archive member {member.name!r} is not a regular file")
                if not is_plain_name(member.name):
                    raise TransferError(f"archive member name {member.name!r} is not a plain "
                                        "file name")
                if member.name in files:
                    raise TransferError(f"archive holds {member.name!r} twice")
                if len(files) >= max_files:
                    raise TransferError(f"archive holds more than {max_files} files")
                handle = tar.extractfile(member)
                if handle is None:
                    raise TransferError(f"cannot read archive member {member.name!r}")
                files[member.name] = handle.read()
    except tarfile.TarError as exc:
        raise TransferError(f"not a valid tar archive: {exc}") from exc
    return files


def write_files_atomically(files: dict[str, bytes], out_dir: str | Path) -> Path:
    """Write verified files to a staging folder beside out_dir, then rename it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, content in files.items():
            if not is_plain_name(name):
                raise TransferError(f"refusing to write file name {name!r}")
            (staging / name).write_bytes(content)
        return atomic_replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_bundle_archive(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Signature, checksums, format, and no file the signed manifest does not list."""
    from sdr_edge.artifacts.bundle import WEIGHTS, BundleError, verify_bundle_bytes

    try:
        manifest = verify_bundle_bytes(files, pubkey)  # signature, format, checksums
    except BundleError as exc:
        raise TransferError(f"bundle refused: {exc}") from exc
    _check_listed(files, manifest, "bundle")
    if WEIGHTS not in manifest["files"]:
        raise TransferError(f"bundle refused: manifest lists no {WEIGHTS}")
    return manifest


def canonical_json(manifest: dict) -> bytes:
    """The exact bytes that are signed (same rule as bundle.manifest_bytes)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def sign_kit(files: dict[str, bytes], key: Ed25519PrivateKey,
             provenance: dict | None = None) -> dict[str, bytes]:
    """The kit's files plus a signed manifest (sha256 of each file), ready to pack."""
    for reserved in (MANIFEST, SIGNATURE):
        if reserved in files:
            raise TransferError(f"kit folder already holds {reserved!r}; it is reserved for "
                                "the registry's signed manifest")
    manifest = {
        "format": KIT_FORMAT,
        "format_version": KIT_VERSION,
        "files": {name: sha256_bytes(content) for name, content in sorted(files.items())},
        "provenance": {"created_unix": int(time.time()), **(provenance or {})},
    }
    data = canonical_json(manifest)
    return {**files, MANIFEST: data, SIGNATURE: sign(key, data)}


def verify_kit_archive(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Same trust rules as a bundle: signed manifest, every checksum, nothing unlisted."""
    from sdr_edge.artifacts.bundle import BundleError, verify_signed_files

    try:
        manifest = verify_signed_files(files, pubkey, KIT_FORMAT, KIT_VERSION, what="kit")
    except BundleError as exc:
        raise TransferError(f"kit refused: {exc}") from exc
    _check_listed(files, manifest, "kit")
    return manifest


def _check_listed(files: dict[str, bytes], manifest: dict, what: str) -> None:
    listed = set(manifest.get("files", {})) | {MANIFEST, SIGNATURE}
    extra = sorted(set(files) - listed)
    if extra:
        raise TransferError(f"{what} refused: files not listed in the signed manifest: "
                            f"{', '.join(extra)}")
