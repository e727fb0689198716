"""Find TensorRT and an NVIDIA GPU before any TensorRT work, and name what is missing.

polygraphy (which builds and runs our engines, and owns their device buffers) imports
TensorRT lazily and fails deep inside a loader when it or the GPU is absent; it cannot tell
whether a CUDA device exists or what it is. So this stays hand-written: the GPU's name and
compute capability (recorded in the engine's metadata, since engines are specific to them)
come from cuda-python (what `sdr-edge[trt]` installs, and what Jetson images carry) or,
failing that, from a CUDA build of torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

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


def quiet_polygraphy() -> None:
    """polygraphy logs at INFO to stdout by default; keep its warnings and errors only."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
