"""The signature kit as a signed transfer archive, built once at start-up and kept in memory.

The run's `kit/` folder is flat (weights, ONNX, preprocessing spec); the registry adds a signed
manifest with the sha256 of every file, so a client verifies the kit exactly like a bundle
before writing it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdr_edge.artifacts.atomic import sha256_bytes
from sdr_edge.artifacts.run_dir import KIT_DIR, RunDirError
from sdr_edge.artifacts.transfer import is_plain_name, pack_files, read_folder, sign_kit


def build_kit_archive(run_dir: str | Path, key: Ed25519PrivateKey,
                      provenance: dict) -> tuple[bytes, str] | None:
    """(tar bytes, sha256 of the signed manifest) of RUN_DIR/kit, or None when there is none."""
    kit_dir = Path(run_dir) / KIT_DIR
    if not kit_dir.is_dir():
        return None
    odd = sorted(p.name for p in kit_dir.iterdir()
                 if not p.name.startswith(".") and (not p.is_file() or not is_plain_name(p.name)))
    if odd:
        raise RunDirError(f"{kit_dir}: the registry serves a flat kit of plain files; "
                          f"cannot serve {', '.join(odd)}")
    files = read_folder(kit_dir)
    if not files:
        return None
    signed = sign_kit(files, key, provenance)
    return pack_files(signed), sha256_bytes(signed["manifest.json"])
