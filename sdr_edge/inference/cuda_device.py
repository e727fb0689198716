"""Find TensorRT and an NVIDIA GPU, and move buffers to and from it.

TensorRT needs both its Python package and a CUDA device; when either is missing we say
which, and how to get it, before doing any work. Device buffers come from cuda-python (what
`sdr-edge[trt]` installs, and what Jetson images carry) or, failing that, from a CUDA build of
torch; both give raw device pointers for TensorRT's tensor-address API.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdr_edge.errors import SdrEdgeError

INSTALL_HINT = (
    "install it with `pip install 'sdr-edge[trt]'` on a Linux machine with an NVIDIA GPU and "
    "CUDA (the wheels come from NVIDIA's index: add `--extra-index-url https://pypi.nvidia.com` "
    "if pip cannot find them), or use the TensorRT that ships with JetPack on a Jetson"
)


class TensorRTUnavailable(SdrEdgeError, RuntimeError):
    """TensorRT or an NVIDIA GPU is missing; the message says which and how to fix it."""


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device an engine is built for or runs on."""

    name: str
    compute_capability: tuple[int, int]
    probe: str  # which library answered: cuda-python or torch

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": list(self.compute_capability),
                "probe": self.probe}


def _cudart() -> Any | None:
    """cuda-python's runtime module under its new or old import path, or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _check(cudart: Any, result: tuple) -> Any:
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error: {text.decode() if isinstance(text, bytes) else text}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def find_nvidia_gpu() -> tuple[GpuInfo | None, str]:
    """The first CUDA device and an empty note, or None and why none was found."""
    notes = []
    cudart = _cudart()
    if cudart is not None:
        try:
            count = _check(cudart, cudart.cudaGetDeviceCount())
            if count > 0:
                props = _check(cudart, cudart.cudaGetDeviceProperties(0))
                name = props.name.decode(errors="replace") if isinstance(props.name, bytes) \
                    else str(props.name)
                return GpuInfo(name.strip("\x00"), (props.major, props.minor), "cuda-python"), ""
            notes.append("cuda-python sees no CUDA device")
        except RuntimeError as exc:
            notes.append(f"cuda-python: {exc}")
    else:
        notes.append("cuda-python is not installed")
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), (major, minor), "torch"), ""
        notes.append(f"torch {torch.__version__} sees no CUDA device")
    return None, "; ".join(notes)


def tensorrt_module() -> tuple[Any | None, str]:
    """The imported `tensorrt` module, or None and the import error."""
    try:
        return importlib.import_module("tensorrt"), ""
    except ImportError as exc:
        return None, str(exc)
    except OSError as exc:  # the package is there but its CUDA libraries are not
        return None, f"tensorrt is installed but its libraries do not load: {exc}"


def missing_message(what: str, trt_error: str | None, gpu_note: str | None) -> str:
    """One message naming everything missing for `what` (None means that part is present)."""
    missing = []
    if trt_error is not None:
        missing.append(f"the TensorRT Python package (`import tensorrt` failed: {trt_error})")
    if gpu_note is not None:
        missing.append(f"an NVIDIA GPU with a working CUDA driver ({gpu_note or 'none found'})")
    if not missing:
        return ""
    return f"{what} needs " + " and ".join(missing) + "; " + INSTALL_HINT


def require_tensorrt_and_gpu(what: str = "TensorRT") -> tuple[Any, GpuInfo]:
    """tensorrt and the GPU, or TensorRTUnavailable naming what is missing."""
    trt, trt_error = tensorrt_module()
    gpu, gpu_note = find_nvidia_gpu()
    if trt is None or gpu is None:
        raise TensorRTUnavailable(missing_message(what, trt_error if trt is None else None,
                                                  gpu_note if gpu is None else None))
    return trt, gpu


class DeviceMemory(Protocol):
    """Raw device allocations and copies on one CUDA stream."""

    name: str
    stream: int

    def alloc(self, nbytes: int) -> int: ...

    def h2d(self, ptr: int, host: np.ndarray) -> None: ...

    def d2h(self, host: np.ndarray, ptr: int) -> None: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class CudaPythonMemory:
    """Device memory through cuda-python's runtime API."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self._stream = _check(cudart, cudart.cudaStreamCreate())
        self.stream = int(self._stream)
        self._ptrs: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = int(_check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), 1))))
        self._ptrs.append(ptr)
        return ptr

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart, self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind,
                                                        self._stream))
        self.synchronize()  # the host array may be freed as soon as we return

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart, self.cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind,
                                                        self._stream))
        self.synchronize()

    def synchronize(self) -> None:
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        for ptr in self._ptrs:
            self.cudart.cudaFree(ptr)
        self._ptrs.clear()
        self.cudart.cudaStreamDestroy(self._stream)


class TorchCudaMemory:
    """Device memory as torch CUDA tensors (when cuda-python is absent)."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._stream = torch.cuda.Stream()
        self.stream = int(self._stream.cuda_stream)
        self._tensors: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self._tensors[t.data_ptr()] = t
        return t.data_ptr()

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(host).view(np.uint8).reshape(-1))
        with self.torch.cuda.stream(self._stream):
            self._tensors[ptr][: src.numel()].copy_(src)
        self.synchronize()

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        self.synchronize()
        flat = self._tensors[ptr][: host.nbytes].cpu().numpy()
        host[...] = flat.view(host.dtype).reshape(host.shape)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self._tensors.clear()


def device_memory() -> DeviceMemory:
    """cuda-python when installed, else torch's CUDA allocator."""
    cudart = _cudart()
    if cudart is not None:
        return CudaPythonMemory(cudart)
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return TorchCudaMemory()
    raise TensorRTUnavailable(
        "running a TensorRT engine needs cuda-python or a CUDA build of torch for device "
        f"buffers; {INSTALL_HINT}"
    )
