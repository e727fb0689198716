"""Bundle -> verified ONNX file: export, convert, check against PyTorch, then publish.

Everything happens in a staging folder beside the output. The file that passes the checks is
the file that is renamed into place, and nothing is written at the output path unless every
check passed: a failed export leaves no model behind, only an error with the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdr_edge.artifacts.atomic import atomic_write, fsync_dir, sha256_bytes, sha256_file
from sdr_edge.artifacts.bundle import MANIFEST, WEIGHTS, load_bundle_and_files
from sdr_edge.artifacts.model_metadata import (
    METADATA_FORMAT,
    PRECISIONS,
    ModelMetadata,
    sidecar_document,
    sidecar_path,
)
from sdr_edge.artifacts.staging import check_replaceable_file
from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.data.sources import ImageSource, load_source
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.onnx_export import (
    INPUT_NAME,
    add_raw_input,
    attach_metadata,
    check_onnx,
    export_fp32,
)
from sdr_edge.export.parity import (
    FP32_ATOL,
    ParityCheck,
    max_abs_check,
    precision_checks,
    raise_on_failure,
)
from sdr_edge.export.quantize import (
    INT8_TARGETS,
    CalibrationError,
    convert_fp16,
    quantize_int8,
    quantized_op_counts,
)
from sdr_edge.inference.base import INPUT_LAYOUT_KEY, NORMALIZED_NCHW, RAW_NHWC
from sdr_edge.inference.runners import OrtRunner
from sdr_edge.models.classifier import SubnetModel

log = logging.getLogger(__name__)

# The raw-input graph against the normalised-input graph it wraps, on the same images: the
# float32 arithmetic is the same as `normalize_batch`, so only ONNX Runtime's kernel choices
# differ (measured 0 on the test model; the bound leaves room for fused kernels).
RAW_INPUT_ATOL = 1e-5
RAW_INPUT_DESCRIPTION = ("uint8 N x H x W x C at the model's size (OpenCV's BGR or gray order); "
                         "in graph: Cast, Div 255, Sub mean, Div std, Transpose to NCHW")


class ExportOptionsError(SdrEdgeError, ValueError):
    """An export option or input does not fit (the message names the flag or the labels)."""


@dataclass
class ExportOptions:
    """How to export; defaults give a dynamic-batch fp32 model at opset 18."""

    precision: str = "fp32"
    batch: int | None = None  # None: dynamic batch axis
    opset: int = 18
    calib_images: Path | None = None
    calib_source: str | None = None
    calib_limit: int = 512
    eval_source: str | None = None
    eval_limit: int = 1000
    int8_target: str = "cpu"
    int8_quantize_all: bool = False  # default keeps the first and last weighted layer in fp32
    tolerance: float | None = None
    seed: int = 0
    progress: bool = True
    raw_input: bool = False  # uint8 NHWC input, normalised inside the graph

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportOptionsError(f"unknown precision {self.precision!r} "
                                     f"({', '.join(PRECISIONS)})")
        if self.int8_target not in INT8_TARGETS:
            raise ExportOptionsError(f"unknown int8 target {self.int8_target!r} "
                                     f"({', '.join(INT8_TARGETS)})")
        if self.calib_images is not None and self.calib_source is not None:
            raise ExportOptionsError("give either --calib-images or --calib-source, not both")
        if self.precision == "int8" and self.calib_images is None and self.calib_source is None:
            raise CalibrationError("int8 export needs calibration images: pass --calib-images DIR "
                                   "(a folder of images like the ones the device will see) or "
                                   "--calib-source SOURCE")
        if self.calib_images is None and self.calib_source is None and self.eval_source is None:
            raise ExportOptionsError("the export is checked against PyTorch on real images: "
                                     "pass --eval-source SOURCE (labelled if possible) or "
                                     "--calib-images DIR")
        if self.opset < 18:
            raise ExportOptionsError(f"opset {self.opset} is too old: sdr-edge exports "
                                     "opset >= 18")
        if self.tolerance is not None and self.tolerance < 0:
            raise ExportOptionsError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.calib_limit < 1 or self.eval_limit < 1:
            raise ExportOptionsError("calibration and evaluation limits must be >= 1")


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    metadata: ModelMetadata
    checks: list[ParityCheck]
    sha256: str
    notes: list[str] = field(default_factory=list)


def _load_calibration(opts: ExportOptions, spec: InputSpec) -> ImageSource | None:
    if opts.calib_images is not None:
        folder = Path(opts.calib_images)
        if not folder.is_dir():
            raise CalibrationError(f"calibration image folder not found: {folder}")
        try:
            src = load_source(str(folder), spec.image_size, spec.channels, opts.calib_limit,
                              opts.seed)
        except ValueError as exc:  # e.g. no readable image in the folder
            raise CalibrationError(f"calibration images unusable: {exc}") from exc
    elif opts.calib_source is not None:
        src = load_source(opts.calib_source, spec.image_size, spec.channels, opts.calib_limit,
                          opts.seed)
    else:
        return None
    if src.skipped:
        log.warning("calibration: skipped %d unreadable file(s)", len(src.skipped))
    return src


def _model_labels(source: ImageSource, spec: InputSpec, num_classes: int | None
                  ) -> np.ndarray | None:
    """The source's labels as indices into the model's classes (by name when both have names)."""
    if source.labels is None or num_classes is None:
        return None
    if spec.label_names and source.label_names and source.label_names != spec.label_names:
        index = {name: i for i, name in enumerate(spec.label_names)}
        unknown = sorted(set(source.label_names) - set(index))
        if unknown:
            raise ExportOptionsError(f"evaluation labels {unknown[:5]} are not among the "
                                     f"model's label names {list(spec.label_names)[:10]}")
        remap = np.asarray([index[n] for n in source.label_names])
        return remap[source.labels]
    if int(source.labels.max()) >= num_classes:
        raise ExportOptionsError(f"evaluation labels go up to {int(source.labels.max())} but "
                                 f"the model has {num_classes} classes")
    return source.labels


def write_json(path: Path, doc: dict) -> Path:
    """Atomically write a world-readable JSON file (it describes a model, nothing secret)."""
    text = json.dumps(doc, indent=2) + "\n"

    def writer(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)

    return atomic_write(path, writer)


def check_output(out: Path) -> None:
    """`out` and its sidecar must be absent or an earlier export (sidecar records its sha256)."""
    check_replaceable_file(out, sidecar_path(out), {METADATA_FORMAT}, "model_sha256")


@torch.inference_mode()
def torch_outputs(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The reference: the PyTorch model's outputs on preprocessed inputs."""
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + batch])).float().numpy()
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def export_model(model: SubnetModel, spec: InputSpec, route: tuple[int, ...], out: str | Path,
                 opts: ExportOptions, provenance: dict | None = None) -> ExportResult:
    """Export, convert and verify `model`; write `out` and its sidecar only if every check passes."""
    opts.validate()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportOptionsError(f"output must end in .onnx, got {out.name}")
    check_output(out)
    output_kind = "logits" if model.num_classes else "features"
    calib = _load_calibration(opts, spec)
    evalsrc = (load_source(opts.eval_source, spec.image_size, spec.channels, opts.eval_limit,
                           opts.seed) if opts.eval_source else None)
    parity_src = evalsrc if evalsrc is not None else calib
    assert parity_src is not None  # validate() guarantees one of them
    x = normalize_batch(parity_src.images, spec)
    labels = _model_labels(evalsrc, spec, model.num_classes) if evalsrc is not None else None
    notes = [f"parity inputs: {len(x)} images from {parity_src.name}"]
    if opts.precision == "int8" and output_kind == "features":
        notes.append("features model: top-1 agreement is undefined, int8 is checked by cosine "
                     "similarity of the feature vectors")
    if output_kind == "logits" and labels is None and opts.precision == "int8":
        notes.append("no labelled --eval-source: the int8 accuracy-drop check was skipped")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    bar = tqdm(total=5, desc=f"export {opts.precision}", disable=not opts.progress, unit="step")
    try:
        bar.set_postfix_str("torch.onnx.export")
        fp32 = export_fp32(model, spec.image_size, spec.channels, stage / "fp32.onnx",
                           output_kind, opts.opset, opts.batch)
        check_onnx(fp32, opts.opset)
        bar.update()

        bar.set_postfix_str("PyTorch reference")
        ref = torch_outputs(model, x)
        checks: list[ParityCheck] = []
        if opts.precision != "fp32":  # the fp32 graph must be right before converting it
            fp32_out = OrtRunner(fp32, require_metadata=False).run(x)
            checks.append(max_abs_check("fp32 vs PyTorch (before conversion)", ref, fp32_out,
                                        FP32_ATOL))
            raise_on_failure("ONNX fp32 export", checks)
        bar.update()

        bar.set_postfix_str(f"convert to {opts.precision}")
        extra: dict = {"exporter": f"torch {torch.__version__} dynamo"}
        candidate = fp32
        if opts.precision == "fp16":
            candidate = convert_fp16(fp32, stage / "fp16.onnx")
            extra["fp16"] = "onnxconverter_common.float16 keep_io_types=True"
        elif opts.precision == "int8":
            calib_x = normalize_batch(calib.images, spec)  # type: ignore[union-attr]
            extra["int8"] = quantize_int8(fp32, stage / "int8.onnx", calib_x, INPUT_NAME,
                                          opts.int8_target, batch=opts.batch or 32,
                                          fixed_batch=opts.batch is not None,
                                          keep_first_last_fp32=not opts.int8_quantize_all,
                                          workdir=stage)
            candidate = stage / "int8.onnx"
            extra["int8"]["quantized_ops"] = quantized_op_counts(candidate)
        extra[INPUT_LAYOUT_KEY] = NORMALIZED_NCHW
        if opts.raw_input:
            raw = add_raw_input(candidate, stage / "raw.onnx", spec, INPUT_NAME)
            want = OrtRunner(candidate, require_metadata=False).run(x)
            have = OrtRunner(raw, require_metadata=False).run(parity_src.images)
            checks.append(max_abs_check("raw-input vs normalised-input graph", want, have,
                                        RAW_INPUT_ATOL))
            raise_on_failure("raw-input graph", checks)
            candidate = raw
            extra[INPUT_LAYOUT_KEY] = RAW_NHWC
            extra["preprocessing"] = RAW_INPUT_DESCRIPTION
        bar.update()

        bar.set_postfix_str("check")
        meta = ModelMetadata(
            input_spec=spec, route=tuple(route), precision=opts.precision,
            output_kind=output_kind, input_name=INPUT_NAME, output_name=output_kind,
            batch="dynamic" if opts.batch is None else int(opts.batch), opset=opts.opset,
            bundle_sha256=(provenance or {}).get("bundle_sha256", ""),
            bundle_weights_sha256=(provenance or {}).get("bundle_weights_sha256", ""),
            extra=extra,
        )
        final = attach_metadata(candidate, stage / out.name, meta)
        check_onnx(final, opts.opset)
        bar.update()

        bar.set_postfix_str("parity")
        got = OrtRunner(final).run(parity_src.images if opts.raw_input else x)
        checks += precision_checks(opts.precision, ref, got, output_kind, labels, opts.tolerance)
        raise_on_failure(f"ONNX {opts.precision} export", checks)
        bar.update()

        digest = sha256_file(final)
        check_output(out)  # again: minutes have passed
        os.replace(final, out)
        fsync_dir(out.parent)
        doc = sidecar_document(meta, digest, [c.to_dict() for c in checks])
        doc["notes"] = notes
        sidecar = write_json(sidecar_path(out), doc)
        return ExportResult(out, sidecar, meta, checks, digest, notes)
    finally:
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)


def export_bundle(bundle_dir: str | Path, pubkey, out: str | Path,
                  opts: ExportOptions) -> ExportResult:
    """Verify the signed bundle, then export its model (see `export_model`)."""
    opts.validate()  # fail on arguments before touching the bundle
    bundle_dir = Path(bundle_dir)
    check_output(Path(out))
    bundle, files = load_bundle_and_files(bundle_dir, pubkey)  # read once, then verified
    provenance = {
        "bundle_sha256": sha256_bytes(files[MANIFEST]),
        "bundle_weights_sha256": bundle.manifest["files"][WEIGHTS],
    }
    return export_model(bundle.model, bundle.input_spec, bundle.route, out, opts, provenance)
