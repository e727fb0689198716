"""The run directory written by `sdr-server train`: names, writers and loaders.

Everything downstream (registry, route-eval, Flower, benchmarks) reads a run through these
functions, so the layout lives in one place:

    config.toml            the resolved training config
    metrics.jsonl          one JSON object per logged event
    teacher.safetensors    phase-0 unified backbone (+ projector), metadata: architecture, input spec
    codebooks.safetensors  residual k-means centroids, one tensor per level ("level_0", ...)
    codes.safetensors      every training image's code [N, R] ("codes") and cluster sizes
    sdrnet.safetensors     the SDRnet, metadata: architecture, input spec
    kit/                   the signature kit (weights, ONNX, preprocessing spec)
    checkpoints/           resumable training state
    report/                plots a person can look at
    manifest.json          sha256 of every file above
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdr_edge.artifacts.atomic import atomic_write_text, sha256_file
from sdr_edge.artifacts.weights import load_tensors, save_tensors
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.resnet import Backbone, BackboneConfig
from sdr_edge.models.sdrnet import SDRnet

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
TEACHER = "teacher.safetensors"
CODEBOOKS = "codebooks.safetensors"
CODES = "codes.safetensors"
SDRNET = "sdrnet.safetensors"
KIT_DIR = "kit"
REPORT_DIR = "report"
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"


class RunDirError(ValueError):
    """A run directory is missing a file or does not match its manifest."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise RunDirError(f"{path.parent}: missing {path.name} (is this a finished sdr-server train run?)")
    return path


def save_sdrnet(run_dir: str | Path, net: SDRnet, spec: InputSpec) -> Path:
    return save_tensors(Path(run_dir) / SDRNET, net.state_dict(),
                        {"architecture": net.arch_dict(), "input_spec": spec.to_dict()})


def load_sdrnet(run_dir: str | Path) -> tuple[SDRnet, InputSpec]:
    """The trained SDRnet (eval mode) and the input spec it was trained with."""
    state, meta = load_tensors(_require(Path(run_dir) / SDRNET))
    net = SDRnet.from_arch_dict(meta["architecture"])
    net.load_state_dict(state, strict=True)
    return net.eval(), InputSpec.from_dict(meta["input_spec"])


def save_teacher(run_dir: str | Path, backbone: Backbone, spec: InputSpec,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The phase-0 backbone; `extra` (e.g. projector weights) is stored under 'heads.' keys."""
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    tensors.update({f"heads.{k}": v for k, v in (extra or {}).items()})
    return save_tensors(Path(run_dir) / TEACHER, tensors,
                        {"architecture": {"backbone": backbone.cfg.to_dict()},
                         "input_spec": spec.to_dict()})


def load_teacher(run_dir: str | Path) -> tuple[Backbone, InputSpec]:
    tensors, meta = load_tensors(_require(Path(run_dir) / TEACHER))
    backbone = Backbone(BackboneConfig.from_dict(meta["architecture"]["backbone"]))
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items()
                              if k.startswith("backbone.")})
    return backbone.eval(), InputSpec.from_dict(meta["input_spec"])


def save_codebooks(run_dir: str | Path, codebooks: list[torch.Tensor]) -> Path:
    return save_tensors(Path(run_dir) / CODEBOOKS,
                        {f"level_{r}": c for r, c in enumerate(codebooks)},
                        {"levels": len(codebooks), "branching": [int(c.shape[0]) for c in codebooks]})


def load_codebooks(run_dir: str | Path) -> list[torch.Tensor]:
    tensors, meta = load_tensors(_require(Path(run_dir) / CODEBOOKS))
    return [tensors[f"level_{r}"] for r in range(int(meta["levels"]))]


def save_codes(run_dir: str | Path, codes: torch.Tensor, source: str) -> Path:
    """Each training image's code, with the per-level cluster sizes in the metadata."""
    codes = codes.to(torch.long)
    sizes = [torch.bincount(codes[:, r]).tolist() for r in range(codes.shape[1])]
    return save_tensors(Path(run_dir) / CODES, {"codes": codes},
                        {"source": source, "cluster_sizes": sizes})


def load_codes(run_dir: str | Path) -> tuple[torch.Tensor, dict]:
    tensors, meta = load_tensors(_require(Path(run_dir) / CODES))
    return tensors["codes"], meta or {}


def run_files(run_dir: Path) -> list[Path]:
    """Every file that belongs in the manifest (checkpoints excluded: they are scratch)."""
    skip = {MANIFEST}
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name not in skip
                  and CHECKPOINT_DIR not in p.relative_to(run_dir).parts
                  and not p.name.startswith("."))


def write_run_manifest(run_dir: str | Path, info: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    files = {str(p.relative_to(run_dir)): sha256_file(p) for p in run_files(run_dir)}
    manifest = {"format": "sdr-edge-run", "format_version": 1, **(info or {}), "files": files}
    return atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_run_manifest(run_dir: str | Path) -> dict:
    """Raise RunDirError when a listed file is missing or changed."""
    run_dir = Path(run_dir)
    manifest = json.loads(_require(run_dir / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        path = run_dir / name
        if not path.is_file():
            raise RunDirError(f"{run_dir}: missing {name}")
        if sha256_file(path) != digest:
            raise RunDirError(f"{run_dir}: {name} does not match its sha256 in {MANIFEST}")
    return manifest
