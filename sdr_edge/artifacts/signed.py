"""The one trust rule for signed folders (bundles and kits), on disk and in memory.

A signed folder is a flat set of regular files with plain names: `manifest.json` (format
marker, sha256 of every other file), `manifest.sig` (Ed25519 signature of the manifest's bytes)
and exactly the files the manifest lists. `verify_signed_files` checks in-memory files (a
download, a Flower message); `read_signed_folder` turns a folder on disk into the same dict,
refusing symlinks, sub-folders and odd names, so a folder on disk passes only if the same
files would pass as an archive. Torch-free: a device verifies kits and bundles without it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Collection
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdr_edge.artifacts.atomic import sha256_bytes
from sdr_edge.artifacts.signing import SignatureError, sign, verify
from sdr_edge.errors import SdrEdgeError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "weights.safetensors"
BUNDLE_FORMAT = "sdr-edge-bundle"
BUNDLE_VERSION = 1
KIT_FORMAT = "sdr-edge-kit"
KIT_VERSION = 1
MAX_FILES = 64
MAX_ARCHIVE_BYTES = 2 << 30
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BundleError(SdrEdgeError, ValueError):
    """A bundle or kit is incomplete, tampered with, unsafe or of an unknown format."""


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical JSON (sorted keys, two-space indent, final newline): the bytes signed."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def sign_manifest(manifest: dict, key: Ed25519PrivateKey) -> dict[str, bytes]:
    """`manifest.json` and `manifest.sig` for a manifest whose "files" lists every other file:
    the one signing rule for bundles and kits, whatever writes them (disk or memory)."""
    if not isinstance(manifest.get("files"), dict):
        raise BundleError("a signed manifest must list its files with their sha256")
    data = manifest_bytes(manifest)
    return {MANIFEST: data, SIGNATURE: sign(key, data)}


def is_plain_name(name: str) -> bool:
    """A single file name: no separators, no '..', no leading dot, no odd characters."""
    return bool(_PLAIN_NAME.match(name)) and ".." not in name


def read_signed_folder(folder: str | Path, max_files: int = MAX_FILES,
                       max_bytes: int = MAX_ARCHIVE_BYTES) -> dict[str, bytes]:
    """Every entry of a signed folder as bytes; anything but plain regular files is refused.

    Read once: the caller verifies and then uses these bytes, so nothing can change between
    the check and the use.
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise BundleError(f"{folder}: is a symbolic link, not a folder")
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder")
    files: dict[str, bytes] = {}
    total = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = folder / entry.name
        if entry.is_symlink():
            raise BundleError(f"{path}: is a symbolic link (a signed folder holds only regular "
                              "files)")
        if not entry.is_file(follow_symlinks=False):
            raise BundleError(f"{path}: is not a regular file")
        if not is_plain_name(entry.name):
            raise BundleError(f"{path}: is not a plain file name")
        if len(files) >= max_files:
            raise BundleError(f"{folder}: holds more than {max_files} files")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BundleError(f"{path}: is not a regular file")
            data = f.read(max_bytes - total + 1)
        total += len(data)
        if total > max_bytes:
            raise BundleError(f"{folder}: over the limit of {max_bytes} bytes")
        files[entry.name] = data
    return files


def verify_signed_files(files: dict[str, bytes], pubkey: Ed25519PublicKey, fmt: str,
                        version: int, what: str = "bundle",
                        required: Collection[str] = ()) -> dict:
    """Signature, format, plain listed names, every sha256, nothing unlisted; the manifest.

    Messages name the file concerned; callers add where the files came from.
    """
    if MANIFEST not in files:
        raise BundleError(f"no {MANIFEST}")
    if SIGNATURE not in files:
        raise BundleError(f"unsigned {what} (no {SIGNATURE})")
    try:
        verify(pubkey, files[MANIFEST], files[SIGNATURE])
    except SignatureError as exc:
        raise BundleError(f"{SIGNATURE}: {exc}") from exc
    try:
        manifest = json.loads(files[MANIFEST])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != fmt or manifest.get("format_version") != version:
        raise BundleError(f"unknown format {manifest.get('format')!r} "
                          f"v{manifest.get('format_version')} (expected {fmt} v{version})")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BundleError(f"{MANIFEST} has no 'files' table")
    for name in listed:
        if not isinstance(name, str) or not is_plain_name(name) or name in (MANIFEST, SIGNATURE):
            raise BundleError(f"{MANIFEST} lists an unsafe file name {name!r}")
    for name in required:
        if name not in listed:
            raise BundleError(f"manifest lists no {name}")
    for name, digest in listed.items():
        if name not in files:
            raise BundleError(f"missing file {name!r}")
        if sha256_bytes(files[name]) != digest:
            raise BundleError(f"checksum mismatch for {name}")
    extra = sorted(set(files) - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(f"files not listed in the signed manifest: {', '.join(extra)}")
    return manifest


def verify_signed_folder(folder: str | Path, pubkey: Ed25519PublicKey, fmt: str, version: int,
                         what: str = "bundle", required: Collection[str] = ()
                         ) -> tuple[dict, dict[str, bytes]]:
    """The same rule on a folder on disk: (manifest, verified file bytes), errors name the folder."""
    files = read_signed_folder(folder)
    try:
        manifest = verify_signed_files(files, pubkey, fmt, version, what, required)
    except BundleError as exc:
        raise BundleError(f"{folder}: {exc}") from exc
    return manifest, files


def verify_bundle_files(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """A bundle's in-memory files (it must list weights.safetensors)."""
    return verify_signed_files(files, pubkey, BUNDLE_FORMAT, BUNDLE_VERSION, "bundle", (WEIGHTS,))


def verify_kit_files(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """A signature kit's in-memory files."""
    return verify_signed_files(files, pubkey, KIT_FORMAT, KIT_VERSION, "kit")


def verify_bundle_folder(folder: str | Path, pubkey: Ed25519PublicKey
                         ) -> tuple[dict, dict[str, bytes]]:
    """A bundle folder on disk, by the same rule as `verify_bundle_files`."""
    return verify_signed_folder(folder, pubkey, BUNDLE_FORMAT, BUNDLE_VERSION, "bundle",
                                (WEIGHTS,))


def verify_kit_folder(folder: str | Path, pubkey: Ed25519PublicKey
                      ) -> tuple[dict, dict[str, bytes]]:
    """A fetched kit folder on disk, by the same rule as `verify_kit_files`."""
    return verify_signed_folder(folder, pubkey, KIT_FORMAT, KIT_VERSION, "kit")
