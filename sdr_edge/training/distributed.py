"""One place for device choice and torch.distributed: the same code runs alone, or under torchrun.

Under `torchrun` the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) are present: the
process group starts with NCCL on CUDA and gloo on CPU. Every rank sees the same seeded
permutation and takes its own slice of each global batch, so all ranks run the same number of
steps (a rank with fewer steps would hang the others in all-reduce).

Waits are bounded on purpose. The process group's collectives time out after
`[train] collective_timeout_s` (passed to `init_process_group`), and the steps only rank 0
does (k-means, the signature kit; hours at ImageNet scale) run outside any collective through
`run_on_main`: the other ranks poll a marker file for at most `[train] main_step_timeout_s`.
So a lost rank surfaces within the collective timeout, while a long single-rank step does not
need a collective timeout of hours (NCCL's watchdog only watches collectives in flight).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.errors import SdrEdgeError

T = TypeVar("T")
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # torch's own default for gloo; NCCL's is 600 s
DEFAULT_MAIN_STEP_TIMEOUT_S = 86400.0


class DeviceSetupError(SdrEdgeError, ValueError):
    """A [train]/[ssl] setting this machine or process count cannot honour (one line)."""


class MainStepError(SdrEdgeError, RuntimeError):
    """Rank 0's single-rank step failed, or did not finish within [train] main_step_timeout_s."""


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


def setup(requested_device: str,
          collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistEnv:
    """Start the process group when launched by torchrun, else a single-process environment.

    `collective_timeout_s` bounds how long any collective waits for a missing rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistEnv(device=pick_device(requested_device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=float(collective_timeout_s)))
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


def run_on_main(env: DistEnv, step: Callable[[], T], marker: str | Path, *, timeout_s: float,
                what: str, poll_s: float = 0.5) -> T | None:
    """Run `step` on rank 0 only, outside any collective; the other ranks wait for it by
    polling `marker` (a file on the run dir's file system, shared by the ranks) for at most
    `timeout_s` seconds. Returns the step's result on rank 0, None elsewhere.

    Rank 0 writes the marker atomically when the step ends: "ok", or "failed: <error>", so a
    failure on rank 0 stops the others at once instead of after the timeout. The marker of an
    earlier, killed attempt is removed before a barrier, so no rank can see a stale one.
    """
    if not env.distributed:
        return step()
    marker = Path(marker)
    if env.is_main:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
    env.barrier()
    result: T | None = None
    if env.is_main:
        try:
            result = step()
        except BaseException as exc:
            atomic_write_text(marker, f"failed: {type(exc).__name__}: {exc}"[:2000])
            raise
        atomic_write_text(marker, "ok")
    else:
        deadline = time.monotonic() + float(timeout_s)
        while not marker.is_file():
            if time.monotonic() > deadline:
                raise MainStepError(
                    f"rank {env.rank} waited {timeout_s:g} s for rank 0's {what} ({marker} "
                    "never appeared); raise [train] main_step_timeout_s, or see rank 0's log")
            time.sleep(poll_s)
        state = marker.read_text(encoding="utf-8")
        if state != "ok":
            raise MainStepError(f"rank 0's {what} {state}")
    env.barrier()
    return result


# ----- GPU training options ([gpu] in the config) ------------------------------------------

def convert_sync_batchnorm(module: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm (torch's converter, which keeps the same parameter and
    buffer tensors, so an optimizer built before still holds them), except inside `skip`
    modules. The original class is remembered for `revert_sync_batchnorm`."""
    if isinstance(module, skip):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module,
                                                                                nn.SyncBatchNorm):
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        synced._sdr_original_class = type(module)  # type: ignore[attr-defined]
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, skip))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo `convert_sync_batchnorm` in place (torch has no inverse): every SyncBatchNorm it
    made becomes its original class again, on the same tensors, so saved weights and later
    phases see a plain model."""
    original = getattr(module, "_sdr_original_class", None)
    if isinstance(module, nn.SyncBatchNorm) and original is not None:
        plain = original(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats)
        if module.affine:
            plain.weight, plain.bias = module.weight, module.bias
        plain.running_mean, plain.running_var = module.running_mean, module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        plain.train(module.training)
        return plain
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batchnorm(child))
    return module


def uses_sync_batchnorm(env: DistEnv, requested: bool) -> bool:
    """[gpu] sync_batchnorm takes effect under DDP on an accelerator only (one process has
    nothing to synchronise; torch's SyncBatchNorm does not run on CPU tensors)."""
    return requested and env.distributed and env.device.type != "cpu"


def prepare_model(model: nn.Module, env: DistEnv, *, find_unused: bool,
                  sync_batchnorm: bool = False, channels_last: bool = False,
                  compile_model: bool = False, compile_backend: str = "inductor") -> nn.Module:
    """The module a phase trains through: `model` itself changed in place (SyncBatchNorm under
    DDP, channels-last weights), wrapped in DDP when distributed, then torch.compile'd when
    asked (compiling the DDP wrapper lets DDPOptimizer split graphs at bucket boundaries;
    `compile_backend` other than inductor is for tests: inductor's first compile of even a tiny
    model took 430 s on the loaded 2-core CI machine).

    SyncBatchNorm is skipped in routed stages: a rank whose batch has no image of an expert
    never calls that expert's layers, and its peers would wait in the all-reduce forever. It
    needs an accelerator (torch's SyncBatchNorm refuses CPU tensors), so CPU runs keep BN.
    """
    if uses_sync_batchnorm(env, sync_batchnorm):
        from sdr_edge.models.sdrnet import RoutedStage

        convert_sync_batchnorm(model, skip=(RoutedStage,))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    if compile_model:
        wrapped = torch.compile(wrapped, backend=compile_backend)
    return wrapped
