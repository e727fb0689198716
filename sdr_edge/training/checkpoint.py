"""Resumable training state in one safetensors file, written atomically; nothing is pickled.

Module states are tensors already. An optimizer's state dict is split into its tensors (stored
under `optim.<name>.<param index>.<key>`) and its JSON-able rest (param groups, scalar state),
which goes into the metadata together with the phase, the epoch and the RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdr_edge.artifacts.run_dir import CHECKPOINT_DIR
from sdr_edge.artifacts.weights import load_tensors, save_tensors

LAST = "last.safetensors"
FORMAT = "sdr-edge-checkpoint"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


@dataclass
class Checkpoint:
    """Where training stood: `meta` (phase, epoch, ...) plus named module/optimizer states."""

    meta: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def save_checkpoint(run_dir: str | Path, meta: dict[str, Any],
                    modules: dict[str, nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Atomically replace RUN_DIR/checkpoints/last.safetensors."""
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
    return save_tensors(checkpoint_path(run_dir), tensors, full_meta)


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The last checkpoint, or None when the run has none yet."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    if not meta or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdr-edge checkpoint")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in meta["modules"]:
        prefix = f"module.{name}."
        modules[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    optimizers = {name: _join_optimizer(name, tensors, info)
                  for name, info in meta["optimizers"].items()}
    return Checkpoint(meta=meta, modules=modules, optimizers=optimizers)


def restore_rng(ckpt: Checkpoint) -> None:
    """Put the global torch RNG back where it was when the checkpoint was written."""
    torch.set_rng_state(torch.tensor(ckpt.meta["torch_rng"], dtype=torch.uint8))
