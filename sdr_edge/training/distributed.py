"""One place for device choice and torch.distributed: the same code runs alone, or under torchrun.

Under `torchrun` the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) are present: the
process group starts with NCCL on CUDA and gloo on CPU. Every rank sees the same seeded
permutation and takes its own slice of each global batch, so all ranks run the same number of
steps (a rank with fewer steps would hang the others in all-reduce).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sdr_edge.errors import SdrEdgeError


class DeviceSetupError(SdrEdgeError, ValueError):
    """A [train]/[ssl] setting this machine or process count cannot honour (one line)."""


@dataclass
class DistEnv:
    """This process's place in the job and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place from `src` to every rank (tensor on the communication device)."""
        if self.distributed:
            moved = tensor.to(self.comm_device)
            dist.broadcast(moved, src)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Same-shaped tensors from every rank, in rank order."""
        if not self.distributed:
            return [tensor]
        moved = tensor.to(self.comm_device).contiguous()
        out = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(out, moved)
        return [t.to(tensor.device) for t in out]

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceSetupError("[train] device = 'cuda' but no CUDA device is available")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def setup(requested_device: str) -> DistEnv:
    """Start the process group when launched by torchrun, else a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistEnv(device=pick_device(requested_device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_batches(perm: np.ndarray, global_batch: int, env: DistEnv) -> list[np.ndarray]:
    """This rank's index slices of every full global batch (the last partial batch is dropped,
    like DistributedSampler with drop_last, so every rank runs the same number of steps)."""
    per_rank = global_batch // env.world_size
    if per_rank < 2:
        raise DeviceSetupError(f"[ssl] batch_size {global_batch} leaves fewer than 2 images per rank "
                         f"with {env.world_size} processes")
    steps = len(perm) // (per_rank * env.world_size)
    out = []
    for i in range(steps):
        start = i * per_rank * env.world_size + env.rank * per_rank
        out.append(perm[start:start + per_rank])
    return out


def sync_buffers(module: nn.Module, env: DistEnv) -> None:
    """BatchNorm statistics differ per rank; take rank 0's so every rank saves the same model."""
    if not env.distributed:
        return
    for buf in module.buffers():
        env.broadcast(buf.data)


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (in state_dict order)."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(module: nn.Module, env: DistEnv) -> list[str]:
    """Every rank's state digest, gathered as bytes (no pickling between processes)."""
    digest = bytes.fromhex(state_digest(module))
    mine = torch.tensor(list(digest), dtype=torch.uint8)
    return [bytes(t.tolist()).hex() for t in env.all_gather(mine)]
