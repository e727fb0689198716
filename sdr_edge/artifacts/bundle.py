"""Sub-net bundles: weights.safetensors + manifest.json + manifest.sig (Ed25519).

A bundle is written to a staging folder and moved into place only when complete; it is read
back only after the signature and every checksum verify, and the model is rebuilt from the
manifest and the safetensors alone (nothing is unpickled).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from sdr_edge.artifacts.atomic import atomic_replace_dir, sha256_bytes, sha256_file
from sdr_edge.artifacts.signing import SignatureError, sign, verify
from sdr_edge.artifacts.weights import load_tensors, save_module
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.classifier import SubnetModel

BUNDLE_FORMAT = "sdr-edge-bundle"
BUNDLE_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class BundleError(ValueError):
    """A bundle is incomplete, tampered with or of an unknown format."""


@dataclass
class Bundle:
    model: SubnetModel
    manifest: dict

    @property
    def route(self) -> tuple[int, ...]:
        return tuple(self.manifest["route"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input_spec"])


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical JSON: the exact bytes that are signed."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_bundle(model: SubnetModel, out_dir: str | Path, route: Sequence[int], spec: InputSpec,
                 key: Ed25519PrivateKey, provenance: dict | None = None,
                 extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a signed bundle atomically (staging folder, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        arch = model.arch_dict()
        save_module(staging / WEIGHTS, model, metadata={"architecture": arch})
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "route": [int(v) for v in route],
            "architecture": arch,
            "input_spec": spec.to_dict(),
            "files": {name: sha256_file(staging / name) for name in files},
            "provenance": {"created_unix": int(time.time()), **(provenance or {})},
        }
        data = manifest_bytes(manifest)
        (staging / MANIFEST).write_bytes(data)
        (staging / SIGNATURE).write_bytes(sign(key, data))
        return atomic_replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_bundle(bundle_dir: str | Path, pubkey: Ed25519PublicKey) -> dict:
    """Check signature, format and every file's sha256; return the manifest or raise."""
    bundle_dir = Path(bundle_dir)
    manifest_path, sig_path = bundle_dir / MANIFEST, bundle_dir / SIGNATURE
    if not manifest_path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}")
    if not sig_path.is_file():
        raise BundleError(f"{bundle_dir}: unsigned bundle (no {SIGNATURE})")
    data = manifest_path.read_bytes()
    try:
        verify(pubkey, data, sig_path.read_bytes())
    except SignatureError as exc:
        raise BundleError(f"{bundle_dir}: {exc}") from exc
    manifest = json.loads(data)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{bundle_dir}: unknown bundle format {manifest.get('format')!r} "
                          f"v{manifest.get('format_version')}")
    files = manifest.get("files", {})
    if WEIGHTS not in files:
        raise BundleError(f"{bundle_dir}: manifest lists no {WEIGHTS}")
    for name, digest in files.items():
        path = bundle_dir / name
        if Path(name).name != name or not path.is_file():
            raise BundleError(f"{bundle_dir}: missing file {name!r}")
        if sha256_file(path) != digest:
            raise BundleError(f"{bundle_dir}: checksum mismatch for {name}")
    return manifest


def verify_signed_files(files: dict[str, bytes], pubkey: Ed25519PublicKey, fmt: str,
                        version: int, what: str = "bundle") -> dict:
    """In-memory files of a signed folder (bundle or kit): the manifest's Ed25519 signature,
    its format and every listed file's sha256, checked before anything touches the disk."""
    if MANIFEST not in files:
        raise BundleError(f"no {MANIFEST}")
    if SIGNATURE not in files:
        raise BundleError(f"unsigned {what} (no {SIGNATURE})")
    try:
        verify(pubkey, files[MANIFEST], files[SIGNATURE])
    except SignatureError as exc:
        raise BundleError(str(exc)) from exc
    manifest = json.loads(files[MANIFEST])
    if manifest.get("format") != fmt or manifest.get("format_version") != version:
        raise BundleError(f"unknown format {manifest.get('format')!r} "
                          f"v{manifest.get('format_version')}")
    for name, digest in manifest.get("files", {}).items():
        if name not in files:
            raise BundleError(f"missing file {name!r}")
        if sha256_bytes(files[name]) != digest:
            raise BundleError(f"checksum mismatch for {name}")
    return manifest


def verify_bundle_bytes(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Same checks as verify_bundle on in-memory files (before anything touches the disk)."""
    return verify_signed_files(files, pubkey, BUNDLE_FORMAT, BUNDLE_VERSION)


def fit_modules_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize Conv2d / BatchNorm / Linear layers to the shapes stored in `state`.

    Structurally pruned models keep the architecture's layout but have fewer channels; the
    saved tensor shapes are the description of those widths, so no pickle is needed.
    """
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if weight is None or tuple(weight.shape) == tuple(getattr(module, "weight", weight).shape):
            continue
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(weight.shape[1] * module.groups, weight.shape[0], module.kernel_size,
                            module.stride, module.padding, module.dilation, module.groups,
                            bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            new = type(module)(weight.shape[0], module.eps, module.momentum, module.affine)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def model_from_state(arch: dict, state: dict[str, torch.Tensor]) -> SubnetModel:
    model = SubnetModel.from_arch_dict(arch)
    fit_modules_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_bundle(bundle_dir: str | Path, pubkey: Ed25519PublicKey) -> Bundle:
    """Verify, then rebuild the model from the manifest and the safetensors alone."""
    manifest = verify_bundle(bundle_dir, pubkey)
    state, _ = load_tensors(Path(bundle_dir) / WEIGHTS)
    return Bundle(model_from_state(manifest["architecture"], state), manifest)
