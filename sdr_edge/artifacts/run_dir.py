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
    work/                  scratch of a running phase (the clustering's float16 embeddings
                           memory map, rank-0 step markers); not in the manifest
    report/                plots a person can look at
    tensorboard/           TensorBoard event files of the live tracking (rank 0)
    manifest.json          sha256 of every file above

Writers stage under hidden names (`.kit.XXXX/` folders, `.NAME.XXXX.tmp` files from
atomic_write); a kill can leave them behind. `clean_staging` removes exactly those names, and
the manifest never lists a hidden or `.tmp` entry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sdr_edge.artifacts.atomic import atomic_write_text, sha256_file
from sdr_edge.artifacts.weights import load_tensors, read_metadata, save_tensors
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.errors import SdrEdgeError
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
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
WORK_DIR = "work"
MANIFEST = "manifest.json"
RUN_ENTRIES = frozenset({CONFIG, METRICS, TEACHER, CODEBOOKS, CODES, SDRNET, KIT_DIR, REPORT_DIR,
                         CHECKPOINT_DIR, WORK_DIR, TENSORBOARD_DIR, MANIFEST})
TMP_SUFFIX = ".tmp"


class RunDirError(SdrEdgeError, ValueError):
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


def save_codebooks(run_dir: str | Path, codebooks: list[torch.Tensor],
                   codes: str = "residual") -> Path:
    """Per-level centroids. Tree codebooks (`codes = "tree"`) hold one row per tree node, so
    their metadata records the kind and the branching (B_r children per node); a residual
    run's metadata is as before tree codes existed, which keeps its run id."""
    rows = [int(c.shape[0]) for c in codebooks]
    meta: dict = {"levels": len(codebooks), "branching": rows}
    if codes == "tree":
        meta["branching"] = [r // p for r, p in zip(rows, [1, *rows[:-1]], strict=True)]
        meta["codes"] = "tree"
    return save_tensors(Path(run_dir) / CODEBOOKS,
                        {f"level_{r}": c for r, c in enumerate(codebooks)}, meta)


def load_codebooks(run_dir: str | Path) -> list[torch.Tensor]:
    tensors, meta = load_tensors(_require(Path(run_dir) / CODEBOOKS))
    return [tensors[f"level_{r}"] for r in range(int(meta["levels"]))]


def codebook_kind(run_dir: str | Path) -> str:
    """"tree" or "residual": which assignment (`assign_tree_codes` / `assign_codes`) gives a
    run's codes from its codebooks."""
    meta = read_metadata(_require(Path(run_dir) / CODEBOOKS)) or {}
    return "tree" if meta.get("codes") == "tree" else "residual"


def save_codes(run_dir: str | Path, codes: torch.Tensor, source: str) -> Path:
    """Each training image's code, with the per-level cluster sizes in the metadata."""
    codes = codes.to(torch.long)
    sizes = [torch.bincount(codes[:, r]).tolist() for r in range(codes.shape[1])]
    return save_tensors(Path(run_dir) / CODES, {"codes": codes},
                        {"source": source, "cluster_sizes": sizes})


def load_codes(run_dir: str | Path) -> tuple[torch.Tensor, dict]:
    tensors, meta = load_tensors(_require(Path(run_dir) / CODES))
    return tensors["codes"], meta or {}


def _is_staging(rel: Path) -> bool:
    """Hidden (staging) names anywhere in the path, or a temporary file."""
    return any(part.startswith(".") for part in rel.parts) or rel.name.endswith(TMP_SUFFIX)


def run_files(run_dir: Path) -> list[Path]:
    """Every file that belongs in the manifest: checkpoints, work files, staging leftovers, the
    report and the TensorBoard events are excluded (the report is a view rebuilt from
    metrics.jsonl by `sdr-server report` and extended by later stages; event files are live logs
    named by host and time, rewritten on resume), so neither makes a finished run fail to verify."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                  and CHECKPOINT_DIR not in p.relative_to(run_dir).parts
                  and p.relative_to(run_dir).parts[0] not in (WORK_DIR, REPORT_DIR, TENSORBOARD_DIR)
                  and not _is_staging(p.relative_to(run_dir)))


def staging_leftovers(run_dir: str | Path) -> list[Path]:
    """What a killed writer of this project leaves: `.kit.*` and `.report.*.staging` (sdr-server
    report) staging folders in the run dir and
    temporary files (`.NAME.*.tmp` from atomic_write, any `report/*.tmp`). Symlinks are never
    listed, so cleaning cannot reach outside the run dir."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    for p in run_dir.glob(".*"):
        if p.is_symlink():
            continue
        if (p.is_dir() and (p.name.startswith(f".{KIT_DIR}.") or (
                p.name.startswith(f".{REPORT_DIR}.") and p.name.endswith(".staging")))) or (
                p.is_file() and p.name.endswith(TMP_SUFFIX)):
            found.append(p)
    for sub in (CHECKPOINT_DIR, REPORT_DIR, KIT_DIR):
        folder = run_dir / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if (p.is_file() and not p.is_symlink() and p.name.endswith(TMP_SUFFIX)
                    and (p.name.startswith(".") or sub == REPORT_DIR)):
                found.append(p)
    return sorted(found)


def clean_staging(run_dir: str | Path) -> list[Path]:
    """Remove the staging leftovers of an earlier, killed run (see `staging_leftovers`)."""
    removed = staging_leftovers(run_dir)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return removed


def foreign_entries(run_dir: str | Path) -> list[str]:
    """Top-level names in `run_dir` that sdr-server train neither writes nor stages."""
    run_dir = Path(run_dir)
    staged = set(staging_leftovers(run_dir))
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and p not in staged)


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
