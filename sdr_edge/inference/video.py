"""Classify the frames of a video file or a camera, in batches, with per-frame results.

Frames come from OpenCV's `cv2.VideoCapture` (a file path, a URL or pipeline OpenCV's
backends take, or an integer camera index), in BGR order like `decode_image`'s images, and
go through the same `prepare_for_model` + `model_input` as still images: a frame and the
same frame saved losslessly as a PNG get the same prediction. Results are handed to a
callback frame by frame, so a caller streams them (JSON lines) instead of waiting for the end
of a camera stream. No torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from sdr_edge.artifacts.model_metadata import MetadataError
from sdr_edge.data.folder import quiet_opencv
from sdr_edge.inference.base import Runner, model_input, runner_layout
from sdr_edge.inference.predict import (
    InferenceInputError,
    output_rows,
    prepare_for_model,
    runner_provider,
)


@dataclass
class FramePrediction:
    """One frame's result: its index in the stream and a class with its probability (or features)."""

    frame: int
    index: int | None = None
    label: str | None = None
    score: float | None = None
    feature_dim: int | None = None
    feature_norm: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class VideoReport:
    """What ran on what, how many frames, and the throughput (end to end and in the model)."""

    source: str
    runtime: str
    provider: str
    input_layout: str
    batch: int
    frames: int = 0
    seconds_total: float = 0.0
    seconds_model: float = 0.0
    note: str | None = None  # a conversion every frame needed, said once (e.g. 3 -> 1 channels)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds_total if self.seconds_total > 0 else 0.0

    @property
    def model_frames_per_s(self) -> float:
        return self.frames / self.seconds_model if self.seconds_model > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source, "runtime": self.runtime, "provider": self.provider,
            "input_layout": self.input_layout, "batch": self.batch,
            **({"note": self.note} if self.note else {}),
            "throughput": {
                "frames": self.frames,
                "seconds_total": round(self.seconds_total, 6),
                "seconds_model": round(self.seconds_model, 6),
                "frames_per_s": round(self.frames_per_s, 2),
                "model_frames_per_s": round(self.model_frames_per_s, 2),
            },
        }


def video_source(value: str | int) -> str | int:
    """A camera index for an all-digit string (`0`, `1`), the string itself otherwise."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def open_capture(source: str | int) -> cv2.VideoCapture:
    """An opened `VideoCapture`, or InferenceInputError naming the source.

    A plain path that does not exist is refused before OpenCV sees it; URLs (`://`) and image
    sequences (`%d` patterns) go to OpenCV as they are.
    """
    if isinstance(source, str) and "://" not in source and "%" not in source:
        path = Path(source)
        if not path.exists():
            raise InferenceInputError(f"video file not found: {source}")
        if not path.is_file():
            raise InferenceInputError(f"video path is not a file: {source}")
    with quiet_opencv():
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        what = f"camera {source}" if isinstance(source, int) else f"video {source}"
        raise InferenceInputError(f"OpenCV cannot open {what} (not a video it can decode, "
                                  "or no such device)")
    return cap


def iter_frames(cap: cv2.VideoCapture, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decoded frames until the stream ends or `max_frames` were read."""
    count = 0
    while max_frames is None or count < max_frames:
        with quiet_opencv():
            ok, frame = cap.read()
        if not ok or frame is None:
            return
        count += 1
        yield frame


def infer_video(runner: Runner, source: str | int, batch: int = 8,
                max_frames: int | None = None,
                on_frame: Callable[[FramePrediction], None] | None = None) -> VideoReport:
    """Run every frame of `source` through `runner`, `batch` frames per model call."""
    if batch < 1:
        raise InferenceInputError(f"--batch must be >= 1, got {batch}")
    if max_frames is not None and max_frames < 1:
        raise InferenceInputError(f"--max-frames must be >= 1, got {max_frames}")
    meta = runner.metadata
    if meta is None:
        raise MetadataError("the model carries no sdr-edge metadata (input spec unknown)")
    spec, kind = meta.input_spec, meta.output_kind
    source = video_source(source)
    report = VideoReport(str(source), runner.describe(), runner_provider(runner),
                         runner_layout(runner), batch)
    start = time.perf_counter()
    cap = open_capture(source)
    pending: list[np.ndarray] = []

    def flush() -> None:
        x = model_input(runner, np.stack(pending), spec)
        t0 = time.perf_counter()
        out = runner.run(x)
        report.seconds_model += time.perf_counter() - t0
        first = report.frames
        if on_frame is not None:
            for i, row in enumerate(output_rows(out, kind, spec.label_names)):
                on_frame(FramePrediction(first + i, **row))
        report.frames += len(pending)
        pending.clear()

    try:
        for frame in iter_frames(cap, max_frames):
            image, note, reason = prepare_for_model(frame, spec)
            if image is None:
                raise InferenceInputError(f"frame {report.frames + len(pending)} of {source}: "
                                          f"{reason}")
            pending.append(image)
            report.note = report.note or note
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    finally:
        cap.release()
    report.seconds_total = time.perf_counter() - start
    if report.frames == 0:
        raise InferenceInputError(f"no frame could be read from {source}")
    return report
