"""Resumable training state in one safetensors file, written atomically; nothing is pickled.

Module states are tensors already. An optimizer's state dict is split into its tensors (stored
under `optim.<name>.<param index>.<key>`) and its JSON-able rest (param groups, scalar state),
which goes into the metadata together with the phase, the epoch and the RNG state.

Integrity: the safetensors header carries `sha256`, a digest of the metadata and of every
tensor (name, dtype, shape, bytes), and loading recomputes it. The digest lives inside the file
rather than in a sidecar so that one atomic rename publishes weights and checksum together (a
kill between two files could never leave them out of step). Before a new checkpoint replaces
`last.safetensors`, the old one becomes `prev.safetensors`; a corrupt or truncated `last` falls
back to `prev` with a one-line warning, and when neither verifies loading refuses with one line
that names the file and suggests `--restart`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdr_edge.artifacts.atomic import atomic_write
from sdr_edge.artifacts.run_dir import CHECKPOINT_DIR
from sdr_edge.artifacts.weights import state_to_tensors
from sdr_edge.errors import SdrEdgeError

LAST = "last.safetensors"
PREV = "prev.safetensors"
CORRUPT_SUFFIX = ".corrupt"
FORMAT = "sdr-edge-checkpoint"
RESTART_HINT = "rerun with --restart to discard this run's checkpoints and train from the start"


class CheckpointError(SdrEdgeError, ValueError):
    """A checkpoint that cannot be trusted (truncated, corrupted, foreign); one-line message."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def previous_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / PREV


@dataclass
class Checkpoint:
    """Where training stood: `meta` (phase, epoch, ...) plus named module/optimizer states."""

    meta: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None
    fallback: str | None = None  # why `last` was not used, when this is `prev`


def _split_optimizer(name: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(name: str, tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, sub = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[sub] = value
    for idx, extra in info["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": info["param_groups"]}


def tensor_digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 over the metadata text and every tensor's name, dtype, shape and raw bytes."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, meta: dict[str, Any],
                    modules: dict[str, nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Write RUN_DIR/checkpoints/last.safetensors atomically; the old `last` becomes `prev`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in (modules or {}).items():
        tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
    optim_info = {}
    for name, opt in (optimizers or {}).items():
        t, info = _split_optimizer(name, opt.state_dict())
        tensors.update(t)
        optim_info[name] = info
    full_meta = {"format": FORMAT, **meta, "modules": sorted(modules or {}),
                 "optimizers": optim_info, "torch_rng": torch.get_rng_state().tolist()}
    tensors = state_to_tensors(tensors)
    meta_json = json.dumps(full_meta, sort_keys=True)
    header = {"json": meta_json, "sha256": tensor_digest(tensors, meta_json)}
    path, prev = checkpoint_path(run_dir), previous_path(run_dir)
    # the old `last` becomes `prev`: a kill leaves last, prev or both valid
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header),
                        keep_previous_as=prev)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """One checkpoint file, verified against its sha256; CheckpointError names what is wrong."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or unreadable ({first})") from None
    meta_json, digest = header.get("json"), header.get("sha256")
    if meta_json is None:
        raise CheckpointError(f"{path} is not an sdr-edge checkpoint (no metadata)")
    if digest is None:
        raise CheckpointError(f"{path} has no sha256 (written by an older sdr-edge?)")
    if tensor_digest(tensors, meta_json) != digest:
        raise CheckpointError(f"{path} is corrupt (its contents do not match its sha256)")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sdr-edge checkpoint")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in meta["modules"]:
        prefix = f"module.{name}."
        modules[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    optimizers = {name: _join_optimizer(name, tensors, info)
                  for name, info in meta["optimizers"].items()}
    return Checkpoint(meta=meta, modules=modules, optimizers=optimizers, path=path)


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies (`last`, else `prev`), or None when there is none.

    Raises CheckpointError (one line, naming the file, suggesting --restart) when checkpoint
    files exist but none of them verifies.
    """
    problems: list[str] = []
    for path in (checkpoint_path(run_dir), previous_path(run_dir)):
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            ckpt.fallback = problems[0]
        return ckpt
    if not problems:
        return None
    raise CheckpointError(f"{'; '.join(problems)}; no earlier checkpoint verifies: {RESTART_HINT}")


def set_aside(path: str | Path) -> Path:
    """Rename a checkpoint that failed to verify to NAME.corrupt, so it never becomes `prev`."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    return target


def discard_checkpoints(run_dir: str | Path) -> list[Path]:
    """Remove this project's checkpoint files (for --restart); nothing else is touched."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    names = {LAST, PREV, LAST + CORRUPT_SUFFIX, PREV + CORRUPT_SUFFIX}
    removed = []
    if folder.is_dir() and not folder.is_symlink():
        for p in sorted(folder.iterdir()):
            staged = p.name.startswith(f".{LAST}.") and p.name.endswith(".tmp")
            if (p.name in names or staged) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed


def restore_rng(ckpt: Checkpoint) -> None:
    """Put the global torch RNG back where it was when the checkpoint was written."""
    torch.set_rng_state(torch.tensor(ckpt.meta["torch_rng"], dtype=torch.uint8))
