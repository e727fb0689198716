"""What every model runner shares: the `Runner` protocol and batch chunking.

Kept apart from `runners` (ONNX Runtime) and `trt_runner` (TensorRT) so that neither runner
module imports the other: `runners.open_runner` imports `trt_runner` lazily, and both import
only this module for the shared parts. Nothing here imports torch or a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from sdr_edge.artifacts.model_metadata import ModelMetadata

DEFAULT_CHUNK = 256


class Runner(Protocol):
    """What `sdr-client infer` and the export checks need from a runtime."""

    metadata: ModelMetadata | None
    runtime: str

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def iter_chunks(n: int, batch: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of `batch`."""
    for start in range(0, n, batch):
        yield start, min(start + batch, n)


def run_in_chunks(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int,
                  fixed: bool) -> np.ndarray:
    """Apply fn to x in chunks of `batch`; a fixed-batch model gets its last chunk padded."""
    if x.shape[0] == 0:
        raise ValueError("no input to run (empty batch)")
    outs = []
    for start, stop in iter_chunks(x.shape[0], batch):
        chunk = x[start:stop]
        if fixed and chunk.shape[0] < batch:
            pad = np.repeat(chunk[-1:], batch - chunk.shape[0], axis=0)
            outs.append(fn(np.concatenate([chunk, pad]))[: chunk.shape[0]])
        else:
            outs.append(fn(chunk))
    return np.concatenate(outs)
