"""Module weights as safetensors: the only format weights cross a boundary in (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdr_edge.artifacts.atomic import atomic_write


def state_to_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies that safetensors accepts (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict | None = None) -> Path:
    """Atomically write tensors; `metadata` (JSON-able) goes into the safetensors header."""
    meta = {"json": json.dumps(metadata, sort_keys=True)} if metadata is not None else None
    tensors = state_to_tensors(tensors)
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def save_module(path: str | Path, module: nn.Module, metadata: dict | None = None) -> Path:
    return save_tensors(path, module.state_dict(), metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and the JSON metadata saved with them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensors[key] = f.get_tensor(key)
    return tensors, (json.loads(meta["json"]) if "json" in meta else None)


def read_metadata(path: str | Path) -> dict | None:
    """Only the JSON metadata of a safetensors file (reads the header, not the weights)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    return json.loads(meta["json"]) if "json" in meta else None
