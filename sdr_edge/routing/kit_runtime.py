"""Run the signature kit with ONNX Runtime and compute a task signature (no torch import).

This is the client's path: decode with OpenCV, preprocess with `sdr_edge.data.preprocess`
(the same evaluation transform training used), run `kit.onnx`, sum each level's
probabilities, then release the exact or the differentially private signature
(`sdr_edge.routing.privacy`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.data.folder import decode_image, list_image_files
from sdr_edge.data.preprocess import InputSpec, normalize_batch, prepare_uint8
from sdr_edge.routing.privacy import exact_or_private
from sdr_edge.routing.signature import Signature

log = logging.getLogger(__name__)

KIT_FORMAT = "sdr-signature-kit"  # same constants as sdr_edge.routing.kit, which imports torch
KIT_JSON = "kit.json"
KIT_ONNX = "kit.onnx"


class KitError(ValueError):
    """A kit folder is missing files, has a wrong checksum or an unknown format."""


class KitRunner:
    """An ONNX Runtime session on `kit.onnx`, with the kit's input spec and output layout."""

    def __init__(self, kit_dir: str | Path, threads: int = 1, verify: bool = True) -> None:
        self.kit_dir = Path(kit_dir)
        info_path = self.kit_dir / KIT_JSON
        if not info_path.is_file():
            raise KitError(f"{self.kit_dir}: not a signature kit (no {KIT_JSON})")
        self.info = json.loads(info_path.read_text())
        if self.info.get("format") != KIT_FORMAT:
            raise KitError(f"{info_path}: unknown format {self.info.get('format')!r}")
        onnx_path = self.kit_dir / KIT_ONNX
        if not onnx_path.is_file():
            raise KitError(f"{self.kit_dir}: missing {KIT_ONNX}")
        if verify and sha256_file(onnx_path) != self.info["files"][KIT_ONNX]:
            raise KitError(f"{onnx_path}: sha256 does not match {KIT_JSON}")
        self.spec = InputSpec.from_dict(self.info["input_spec"])
        self.branching = tuple(int(b) for b in self.info["branching"])
        self.offsets = [int(o) for o in self.info["output"]["level_offsets"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(onnx_path), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.info["input"]["name"]
        self.output_name = self.info["output"]["name"]

    def probabilities(self, images_nchw: np.ndarray) -> list[np.ndarray]:
        """Normalised float32 N x C x H x W -> one N x B_r float32 array per level."""
        x = np.ascontiguousarray(images_nchw, dtype=np.float32)
        expected = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"kit input must be N x {expected[0]} x {expected[1]} x "
                             f"{expected[2]}, got {tuple(x.shape)}")
        probs = self.session.run([self.output_name], {self.input_name: x})[0]
        return [probs[:, o:o + b] for o, b in zip(self.offsets, self.branching, strict=True)]

    def level_sums(self, batches: Iterable[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Sum of each level's probabilities over uint8 NHWC batches (at the spec size), and N.

        Each image's probabilities are renormalised in float64 so every one contributes an
        L1 norm of exactly 1 per level (what the DP sensitivity assumes).
        """
        sums = [np.zeros(b, dtype=np.float64) for b in self.branching]
        count = 0
        for batch in batches:
            for r, p in enumerate(self.probabilities(normalize_batch(batch, self.spec))):
                p = np.clip(p.astype(np.float64), 0.0, None)
                p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
                sums[r] += p.sum(axis=0)
            count += int(batch.shape[0])
        return sums, count


def _batches(images: Iterable[np.ndarray], spec: InputSpec, batch_size: int) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    for im in images:
        buf.append(prepare_uint8(im, spec.image_size, spec.channels))
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def _decoded_folder(folder: Path, skipped: list[Path]) -> Iterator[np.ndarray]:
    files = list_image_files(folder)
    if not files:
        raise ValueError(f"no image files (.png, .jpg, .jpeg, .bmp) under {folder}")
    for path in files:
        image = decode_image(path)
        if image is None:
            skipped.append(path)
            continue
        yield image


def compute_signature(kit_dir: str | Path | KitRunner,
                      images: Sequence[np.ndarray] | np.ndarray | str | Path,
                      dp_epsilon: float | None = None, rng: np.random.Generator | None = None,
                      *, threads: int = 1, batch_size: int = 256,
                      skipped: list[Path] | None = None) -> Signature:
    """Signature of decoded images (any size/channels) or of every image under a folder.

    Unreadable files in a folder are skipped and appended to `skipped`; a folder with no
    readable image is an error. `dp_epsilon` releases the private signature instead.
    """
    runner = kit_dir if isinstance(kit_dir, KitRunner) else KitRunner(kit_dir, threads=threads)
    skipped = skipped if skipped is not None else []
    if isinstance(images, str | Path):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        stream: Iterable[np.ndarray] = _decoded_folder(folder, skipped)
        where = str(folder)
    else:
        stream, where = images, "the given images"
    sums, count = runner.level_sums(_batches(stream, runner.spec, batch_size))
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", len(skipped), where)
    if count == 0:
        raise ValueError(f"no readable image in {where} ({len(skipped)} unreadable file(s))")
    return exact_or_private(sums, count, dp_epsilon, rng)
