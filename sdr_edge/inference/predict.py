"""Classify (or embed) a folder of images on the device, one bad file never stopping the rest.

Decoding is `sdr_edge.data.folder.decode_image` (OpenCV) and preprocessing is
`prepare_uint8` + `normalize_batch` from `sdr_edge.data.preprocess`: the evaluation transform
of training, applied per image so that an image that cannot be converted is reported and
skipped instead of failing the batch. A raw-input graph gets the `prepare_uint8` images as they
are and normalises them itself (`base.model_input`). No torch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sdr_edge.artifacts.model_metadata import MetadataError
from sdr_edge.data.folder import IMAGE_SUFFIXES, decode_image, list_image_files
from sdr_edge.data.preprocess import InputSpec, prepare_uint8
from sdr_edge.errors import SdrEdgeError
from sdr_edge.inference.base import Runner, model_input, runner_layout


class InferenceInputError(SdrEdgeError, ValueError):
    """What `infer` was asked to run on cannot be used (no images, a bad batch size)."""


@dataclass
class Prediction:
    """One image's result: a class with its probability, or a feature vector's size and norm."""

    path: str
    index: int | None = None
    label: str | None = None
    score: float | None = None
    feature_dim: int | None = None
    feature_norm: float | None = None
    note: str | None = None


@dataclass
class InferenceReport:
    """Predictions, skipped files with reasons, and throughput."""

    runtime: str
    provider: str = ""
    input_layout: str = ""
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    seconds_total: float = 0.0
    seconds_model: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.predictions) / self.seconds_total if self.seconds_total > 0 else 0.0

    @property
    def model_images_per_s(self) -> float:
        return len(self.predictions) / self.seconds_model if self.seconds_model > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime,
            "provider": self.provider,
            "input_layout": self.input_layout,
            "predictions": [{k: v for k, v in asdict(p).items() if v is not None}
                            for p in self.predictions],
            "skipped": self.skipped,
            "throughput": {
                "images": len(self.predictions),
                "seconds_total": round(self.seconds_total, 6),
                "seconds_model": round(self.seconds_model, 6),
                "images_per_s": round(self.images_per_s, 2),
                "model_images_per_s": round(self.model_images_per_s, 2),
            },
        }


def collect_images(target: str | Path) -> list[Path]:
    """The image files of a folder (recursive, sorted), or a single image file."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise FileNotFoundError(f"image folder not found: {target}")
    files = list_image_files(target)
    if not files:
        raise InferenceInputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {target}")
    return files


def prepare_for_model(image: np.ndarray, spec: InputSpec
                      ) -> tuple[np.ndarray | None, str | None, str | None]:
    """(uint8 HxWxC image at the model's size, conversion note, None) or (None, None, reason)."""
    have = 1 if image.ndim == 2 else int(image.shape[2])
    try:
        prepared = prepare_uint8(image, spec.image_size, spec.channels)
    except ValueError as exc:
        return None, None, f"has {have} channel(s), the model takes {spec.channels}: {exc}"
    note = None if have == spec.channels else f"converted {have} -> {spec.channels} channel(s)"
    return prepared, note, None


def load_for_model(path: Path, spec: InputSpec
                   ) -> tuple[np.ndarray | None, str | None, str | None]:
    """Decode with OpenCV, then `prepare_for_model`; unreadable files give a reason instead."""
    image = decode_image(path)
    if image is None:
        return None, None, "unreadable: not a decodable image (corrupt, truncated or empty)"
    return prepare_for_model(image, spec)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def runner_provider(runner: Runner) -> str:
    """The provider a runner runs on: ONNX Runtime's provider name, or the runtime's name."""
    return getattr(runner, "provider", None) or runner.runtime


def output_rows(out: np.ndarray, kind: str, label_names: tuple[str, ...]) -> list[dict]:
    """Per input: index, label and probability (logits), or feature size and norm (features)."""
    if kind == "logits":
        rows = []
        for p in softmax(out.astype(np.float64)):
            i = int(p.argmax())
            rows.append({"index": i, "label": label_names[i] if i < len(label_names) else str(i),
                         "score": float(p[i])})
        return rows
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    return [{"feature_dim": int(out.shape[1]), "feature_norm": float(n)} for n in norms]


def _predictions(paths: list[Path], notes: list[str | None], out: np.ndarray, kind: str,
                 label_names: tuple[str, ...]) -> list[Prediction]:
    rows = output_rows(out, kind, label_names)
    return [Prediction(str(path), note=note, **row)
            for path, note, row in zip(paths, notes, rows, strict=True)]


def infer_images(runner: Runner, target: str | Path, batch: int = 32,
                 progress: bool = True) -> InferenceReport:
    """Run every image under `target` through `runner` in batches of `batch`."""
    if batch < 1:
        raise InferenceInputError(f"--batch must be >= 1, got {batch}")
    meta = runner.metadata
    if meta is None:
        raise MetadataError("the model carries no sdr-edge metadata (input spec unknown)")
    spec, kind = meta.input_spec, meta.output_kind
    files = collect_images(target)
    report = InferenceReport(runtime=runner.describe(), provider=runner_provider(runner),
                             input_layout=runner_layout(runner))
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc="infer", unit="img", disable=not progress)
    for i in range(0, len(files), batch):
        images, paths, notes = [], [], []
        for path in files[i:i + batch]:
            image, note, reason = load_for_model(path, spec)
            if image is None:
                report.skipped.append({"path": str(path), "reason": reason})
            else:
                images.append(image)
                paths.append(path)
                notes.append(note)
        bar.update(len(files[i:i + batch]))
        if not images:
            continue
        x = model_input(runner, np.stack(images), spec)
        t0 = time.perf_counter()
        out = runner.run(x)
        report.seconds_model += time.perf_counter() - t0
        report.predictions.extend(_predictions(paths, notes, out, kind, spec.label_names))
    bar.close()
    report.seconds_total = time.perf_counter() - start
    return report
