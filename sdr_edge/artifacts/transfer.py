"""Moving a folder of signed files over the network: an uncompressed tar read only in memory.

Bundles and signature kits travel as a plain tar of their top-level files. The receiver parses
the archive in memory, accepts nothing but regular files with plain names (no paths, links,
devices, duplicates), checks the Ed25519 signature and every checksum, and only then writes the
files to a staging folder that is renamed into place. A refused archive leaves nothing behind.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdr_edge.artifacts.atomic import sha256_bytes
from sdr_edge.artifacts.signed import (  # noqa: F401 - re-exported (torch-free names)
    KIT_FORMAT,
    KIT_VERSION,
    MANIFEST,
    MAX_ARCHIVE_BYTES,
    MAX_FILES,
    SIGNATURE,
    BundleError,
    is_plain_name,
    sign_manifest,
    verify_bundle_files,
    verify_kit_files,
)
from sdr_edge.artifacts.staging import resolve_out, staged_dir
from sdr_edge.errors import SdrEdgeError

TAR_MEDIA_TYPE = "application/x-tar"


class TransferError(SdrEdgeError, ValueError):
    """An archive is malformed, unsafe, unsigned or does not verify."""


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
    """Write verified files to a staging folder beside out_dir, then swap it into place.

    An existing out_dir must be empty or an earlier bundle/kit of ours (staging.py); anything
    else is refused with an OutputError naming it, and nothing is deleted.
    """
    out = resolve_out(out_dir)
    for name in files:
        if not is_plain_name(name):
            raise TransferError(f"refusing to write file name {name!r}")
    with staged_dir(out) as staging:
        for name, content in files.items():
            (staging / name).write_bytes(content)
    return out


def verify_bundle_archive(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Signature, checksums, format, and no file the signed manifest does not list."""
    try:
        return verify_bundle_files(files, pubkey)
    except BundleError as exc:
        raise TransferError(f"bundle refused: {exc}") from exc


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
    return {**files, **sign_manifest(manifest, key)}


def verify_kit_archive(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Same trust rules as a bundle: signed manifest, every checksum, nothing unlisted."""
    try:
        return verify_kit_files(files, pubkey)
    except BundleError as exc:
        raise TransferError(f"kit refused: {exc}") from exc
