"""Run the signature kit with ONNX Runtime and compute a task signature (no torch import).

This is the client's path: decode with OpenCV, preprocess with `sdr_edge.data.preprocess`
(the same evaluation transform training used), run `kit.onnx`, sum each level's
probabilities, then release the exact or the differentially private signature
(`sdr_edge.routing.privacy`), which names the kit's run (`run_id` in kit.json).

Trust. A kit fetched from a registry (`sdr-client fetch --kit`) carries the registry's signed
manifest. Given the registry's public key, `KitRunner` checks that manifest's Ed25519
signature and every file's sha256 by the rule that checks a kit archive at fetch time
(`sdr_edge.artifacts.signed`), then runs the very bytes it verified: a kit.onnx swapped together with a matching kit.json is refused, and nothing read
after the check can differ from what was checked. Without a key only kit.json's own sha256 of
kit.onnx is checked, which catches corruption, not tampering (fine for RUN_DIR/kit on the
server, not for a device).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sdr_edge.artifacts.atomic import sha256_bytes
from sdr_edge.data.folder import decode_image, list_image_files
from sdr_edge.data.preprocess import InputSpec, normalize_batch, prepare_uint8
from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.privacy import exact_or_private
from sdr_edge.routing.signature import Signature, SignatureValidationError, check_run_id_format

log = logging.getLogger(__name__)

KIT_FORMAT = "sdr-signature-kit"  # same constants as sdr_edge.routing.kit, which imports torch
KIT_JSON = "kit.json"
KIT_ONNX = "kit.onnx"


class KitError(SdrEdgeError, ValueError):
    """A kit folder is missing files, has a wrong checksum or an unknown format."""


def verify_kit(kit_dir: str | Path, pubkey: Ed25519PublicKey) -> dict[str, bytes]:
    """The files of a fetched kit folder, once its signed manifest and every checksum verify.

    The rule is the project's one for signed folders (`sdr_edge.artifacts.signed`), the same
    that checked the kit archive at fetch time; a refusal is a KitError whose one line names
    the folder and the file at fault.
    """
    from sdr_edge.artifacts.signed import MANIFEST, BundleError, verify_kit_folder

    kit_dir = Path(kit_dir)
    if kit_dir.is_dir() and not (kit_dir / MANIFEST).exists() and (kit_dir / KIT_JSON).is_file():
        raise KitError(f"{kit_dir}: no signed {MANIFEST}: only a kit fetched with "
                       "`sdr-client fetch --kit` can be verified")
    try:
        return verify_kit_folder(kit_dir, pubkey)[1]
    except BundleError as exc:
        raise KitError(f"kit refused: {exc}") from exc


class KitRunner:
    """An ONNX Runtime session on `kit.onnx`, with the kit's input spec, layout and run id.

    With `pubkey`, the folder's signed manifest is verified first and the session runs the
    verified bytes (see the module docstring); `verify` alone checks kit.json's sha256.
    """

    def __init__(self, kit_dir: str | Path, threads: int = 1, verify: bool = True,
                 pubkey: Ed25519PublicKey | None = None) -> None:
        self.kit_dir = Path(kit_dir)
        info_path, onnx_path = self.kit_dir / KIT_JSON, self.kit_dir / KIT_ONNX
        files = verify_kit(self.kit_dir, pubkey) if pubkey is not None else None
        self.verified = files is not None
        if files is not None:
            info_bytes, onnx_bytes = files.get(KIT_JSON), files.get(KIT_ONNX)
        else:
            info_bytes = info_path.read_bytes() if info_path.is_file() else None
            onnx_bytes = onnx_path.read_bytes() if onnx_path.is_file() else None
        if info_bytes is None:
            raise KitError(f"{self.kit_dir}: not a signature kit (no {KIT_JSON})")
        try:
            self.info = json.loads(info_bytes)
        except ValueError as exc:
            raise KitError(f"{info_path}: not valid JSON ({exc})") from exc
        if not isinstance(self.info, dict) or self.info.get("format") != KIT_FORMAT:
            raise KitError(f"{info_path}: unknown format "
                           f"{self.info.get('format') if isinstance(self.info, dict) else None!r}")
        if onnx_bytes is None:
            raise KitError(f"{self.kit_dir}: missing {KIT_ONNX}")
        if (verify or files is not None) and \
                sha256_bytes(onnx_bytes) != self.info.get("files", {}).get(KIT_ONNX):
            raise KitError(f"{onnx_path}: sha256 does not match {KIT_JSON}")
        try:
            self.run_id = check_run_id_format(self.info.get("run_id"))
        except SignatureValidationError as exc:
            raise KitError(f"{info_path}: {exc}") from exc
        self.spec = InputSpec.from_dict(self.info["input_spec"])
        self.branching = tuple(int(b) for b in self.info["branching"])
        self.offsets = [int(o) for o in self.info["output"]["level_offsets"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the bytes checked above, not the path: the file may change after the check
        self.session = ort.InferenceSession(onnx_bytes, opts,
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
            for r, p in enumerate(self.image_probabilities(batch)):
                sums[r] += p.sum(axis=0)
            count += int(batch.shape[0])
        return sums, count

    def image_probabilities(self, batch_uint8: np.ndarray) -> list[np.ndarray]:
        """A uint8 NHWC batch (at the spec size) -> one N x B_r float64 array per level, each
        image's row renormalised to sum to exactly 1."""
        out = []
        for p in self.probabilities(normalize_batch(batch_uint8, self.spec)):
            p = np.clip(p.astype(np.float64), 0.0, None)
            out.append(p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300))
        return out


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
        raise KitError(f"no image files (.png, .jpg, .jpeg, .bmp) under {folder}")
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
                      skipped: list[Path] | None = None,
                      pubkey: Ed25519PublicKey | None = None) -> Signature:
    """Signature of decoded images (any size/channels) or of every image under a folder.

    Unreadable files in a folder are skipped and appended to `skipped`; a folder with no
    readable image is an error. `dp_epsilon` releases the private signature instead. The
    signature carries the kit's run id; `pubkey` verifies a kit folder first (KitRunner).
    """
    runner = kit_dir if isinstance(kit_dir, KitRunner) else KitRunner(kit_dir, threads=threads,
                                                                      pubkey=pubkey)
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
        raise KitError(f"no readable image in {where} ({len(skipped)} unreadable file(s))")
    return exact_or_private(sums, count, dp_epsilon, rng, run_id=runner.run_id)
