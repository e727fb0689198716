"""Sub-net bundles: weights.safetensors + manifest.json + manifest.sig (Ed25519).

A bundle is written to a staging folder and moved into place only when complete; it is read
back only after the signature and every checksum verify, and the model is rebuilt from the
manifest and the safetensors alone (nothing is unpickled).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.signed import (  # noqa: F401 - re-exported: the one bundle rule
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    BundleError,
    sign_manifest,
    verify_bundle_files,
    verify_bundle_folder,
    verify_signed_files,
)
from sdr_edge.artifacts.staging import resolve_out, staged_dir
from sdr_edge.artifacts.weights import save_module
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.classifier import SubnetModel


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


def write_bundle_files(model: SubnetModel, folder: Path, route: Sequence[int], spec: InputSpec,
                       key: Ed25519PrivateKey, provenance: dict | None = None,
                       extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a signed bundle into an empty folder (a staging folder: see `write_bundle`)."""
    folder = Path(folder)
    arch = model.arch_dict()
    save_module(folder / WEIGHTS, model, metadata={"architecture": arch})
    for name, data in (extra_files or {}).items():
        if name in (WEIGHTS, MANIFEST, SIGNATURE):
            raise BundleError(f"extra file name {name!r} is reserved")
        (folder / name).write_bytes(data)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "route": [int(v) for v in route],
        "architecture": arch,
        "input_spec": spec.to_dict(),
        "files": {name: sha256_file(folder / name) for name in files},
        "provenance": {"created_unix": int(time.time()), **(provenance or {})},
    }
    for name, data in sign_manifest(manifest, key).items():
        (folder / name).write_bytes(data)
    return folder


def write_bundle(model: SubnetModel, out_dir: str | Path, route: Sequence[int], spec: InputSpec,
                 key: Ed25519PrivateKey, provenance: dict | None = None,
                 extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a signed bundle atomically; an existing `out_dir` must be empty or a bundle of ours."""
    out = resolve_out(out_dir)
    with staged_dir(out) as staging:
        write_bundle_files(model, staging, route, spec, key, provenance, extra_files)
    return out


def verify_bundle(bundle_dir: str | Path, pubkey: Ed25519PublicKey) -> dict:
    """Signature, format, every sha256 and nothing unlisted (no links); the manifest or raise."""
    return verify_bundle_folder(bundle_dir, pubkey)[0]


def verify_bundle_bytes(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> dict:
    """Same checks as verify_bundle on in-memory files (before anything touches the disk)."""
    return verify_bundle_files(files, pubkey)


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


def bundle_from_files(files: dict[str, bytes], pubkey: Ed25519PublicKey) -> Bundle:
    """Verify in-memory files, then rebuild the model from exactly those bytes."""
    manifest = verify_bundle_files(files, pubkey)
    return Bundle(model_from_state(manifest["architecture"],
                                   load_safetensors_bytes(files[WEIGHTS])), manifest)


def load_bundle_and_files(bundle_dir: str | Path, pubkey: Ed25519PublicKey
                          ) -> tuple[Bundle, dict[str, bytes]]:
    """Verify a bundle folder and rebuild its model from the verified bytes (read once)."""
    manifest, files = verify_bundle_folder(bundle_dir, pubkey)
    return Bundle(model_from_state(manifest["architecture"],
                                   load_safetensors_bytes(files[WEIGHTS])), manifest), files


def load_bundle(bundle_dir: str | Path, pubkey: Ed25519PublicKey) -> Bundle:
    """Verify a bundle folder, then rebuild the model from the verified bytes."""
    return load_bundle_and_files(bundle_dir, pubkey)[0]
