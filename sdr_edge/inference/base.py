"""What every model runner shares: the `Runner` protocol and batch chunking.

Kept apart from `runners` (ONNX Runtime) and `trt_runner` (TensorRT) so that neither runner
module imports the other: `runners.open_runner` imports `trt_runner` lazily, and both import
only this module for the shared parts. Nothing here imports torch or a runtime.

Input layouts: a model exported as today takes float32 NCHW images normalised on the host
(`normalize_batch`); one exported with `sdr-export onnx --raw-input` takes the uint8 NHWC
images OpenCV decodes (at the model's size) and normalises inside its graph. The metadata
records which (`extra["input_layout"]`), and `model_input` feeds either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from sdr_edge.artifacts.model_metadata import MetadataError, ModelMetadata
from sdr_edge.data.preprocess import InputSpec, normalize_batch

DEFAULT_CHUNK = 256

INPUT_LAYOUT_KEY = "input_layout"
NORMALIZED_NCHW = "float32_nchw_normalized"
RAW_NHWC = "uint8_nhwc"
INPUT_LAYOUTS = (NORMALIZED_NCHW, RAW_NHWC)


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


def metadata_layout(meta: ModelMetadata | None) -> str:
    """The input layout a model's metadata records; models from before it existed are NCHW."""
    if meta is None:
        return NORMALIZED_NCHW
    layout = meta.extra.get(INPUT_LAYOUT_KEY, NORMALIZED_NCHW)
    if layout not in INPUT_LAYOUTS:
        raise MetadataError(f"unknown input layout {layout!r} in the model's metadata "
                            f"({', '.join(INPUT_LAYOUTS)})")
    return layout


def runner_layout(runner: Runner) -> str:
    """The layout a runner feeds: its own (read from the graph) or else its metadata's."""
    return getattr(runner, "input_layout", None) or metadata_layout(runner.metadata)


def model_input(runner: Runner, images_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N x H x W x C images at the model's size -> what the runner's model takes.

    A raw-input graph gets them as they are (it normalises inside); any other model gets the
    training evaluation transform applied here.
    """
    if runner_layout(runner) == RAW_NHWC:
        if images_uint8.ndim != 4 or images_uint8.shape[3] != spec.channels:
            raise ValueError(f"expected N x H x W x {spec.channels} images, "
                             f"got shape {tuple(images_uint8.shape)}")
        return np.ascontiguousarray(images_uint8, dtype=np.uint8)
    return normalize_batch(images_uint8, spec)
