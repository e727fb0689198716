"""Compare a model runner with ONNX Runtime through polygraphy, with tolerances per precision.

`sdr-export trt` uses this to check the engine it built (polygraphy's `TrtRunner` on the saved
file) against our own ONNX Runtime session on the ONNX it came from; nothing here needs
TensorRT, so the same comparison runs on CPUs with polygraphy's `OnnxrtRunner` as the
candidate (that is how it is tested). polygraphy's `Comparator.run` feeds both runners the same
batches and `Comparator.compare_accuracy` with `SimpleCompareFunc` checks an error statistic
against atol/rtol (polygraphy docs: comparator/README; `CompareFunc.simple` is its deprecated
alias). int8 adds the check elementwise bounds cannot express: the share of unchanged
decisions (see `parity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdr_edge.data.folder import SourceError, scan_folder
from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.parity import ParityCheck, cosine_check, top1_agreement_check
from sdr_edge.inference.cuda_device import quiet_polygraphy


@dataclass(frozen=True)
class Tolerance:
    """polygraphy's error statistic and bound: atol = tol * max(1, max|ref|), rtol = tol.

    Scaling atol by the reference's range keeps one rule for logits and features of any
    magnitude (the rule `sdr-export onnx` uses); polygraphy passes an output when the statistic
    is within atol or within rtol (relative to the reference).
    """

    stat: str
    tol: float


# Engine vs ONNX Runtime on the same ONNX: different kernels and accumulation orders, so the
# bounds are looser than the export's PyTorch checks (polygraphy keeps TF32 off for fp32).
# int8 engines and ONNX Runtime round activations at slightly different points, so a few
# elements move by one quantization step: int8 checks the mean error, plus decisions.
TOLERANCES = {
    "fp32": Tolerance("max", 1e-3),
    "fp16": Tolerance("max", 1e-2),
    "int8": Tolerance("mean", 5e-2),
}
INT8_MIN_AGREEMENT = 0.99
INT8_MIN_COSINE = 0.99


class CompareError(SdrEdgeError, ValueError):
    """Comparison inputs are unusable (unknown precision, no readable comparison image)."""


@dataclass(frozen=True)
class Batches:
    """Comparison batches (each within the runners' batch range) and their unpadded sizes."""

    arrays: list[np.ndarray]
    valid: list[int]

    @property
    def count(self) -> int:
        return int(sum(self.valid))


@dataclass
class Comparison:
    """The checks that decide, and polygraphy's statistics for the report."""

    checks: list[ParityCheck]
    report: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def comparison_inputs(spec: InputSpec, count: int, seed: int,
                      images: Path | None = None) -> tuple[np.ndarray, str]:
    """Preprocessed images from a folder (the first `count`), else standard normal inputs.

    Real images (the bundle's calibration images, say) exercise the value range the device
    sees; the random fallback has the scale of normalised images and needs no data.
    """
    if images is not None:
        try:
            scan = scan_folder(images, spec.image_size, spec.channels)
        except (FileNotFoundError, SourceError) as exc:
            raise CompareError(f"--compare-images: {exc}") from exc
        x = normalize_batch(scan.images[:count], spec)
        return x, f"{x.shape[0]} image(s) from {images}"
    rng = np.random.default_rng(seed)
    shape = (count, spec.channels, spec.image_size, spec.image_size)
    return rng.standard_normal(shape).astype(np.float32), f"{count} standard normal input(s)"


def make_batches(x: np.ndarray, min_batch: int, opt_batch: int) -> Batches:
    """Chunks of `opt_batch`, padded up to `min_batch`, plus one of `min_batch` rows.

    The extra small batch runs the smallest profile shape too, not only full chunks.
    """
    if x.shape[0] == 0:
        raise CompareError("the comparison needs at least one input")
    arrays, valid = [], []
    chunks = [x[i:i + opt_batch] for i in range(0, x.shape[0], opt_batch)]
    if min_batch < opt_batch:
        chunks.append(x[:min_batch])
    for chunk in chunks:
        n = chunk.shape[0]
        if n < min_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], min_batch - n, axis=0)])
        arrays.append(np.ascontiguousarray(chunk, dtype=np.float32))
        valid.append(n)
    return Batches(arrays, valid)


def reference_runner(session, name: str = "onnxruntime"):
    """polygraphy's ONNX Runtime runner around an existing session (ours: `OrtRunner.session`)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(session, name=name)


def _gather(outputs: list, name: str, valid: list[int]) -> np.ndarray:
    return np.concatenate([np.asarray(it[name])[:n] for it, n in
                           zip(outputs, valid, strict=True)])


def _stat_summary(per_iteration: list[dict], output: str, stat: str) -> dict:
    results = [it[output] for it in per_iteration]
    return {
        "max_absdiff": max(r.max_absdiff for r in results),
        "max_reldiff": max(r.max_reldiff for r in results),
        "mean_absdiff": float(np.mean([r.mean_absdiff for r in results])),
        "checked_stat": stat,
        "checked_value": max(getattr(r, f"{stat}_absdiff") for r in results),
        "iterations_passed": sum(bool(r) for r in results),
        "iterations": len(results),
    }


def compare_runners(candidate, reference, batches: Batches, input_name: str, precision: str,
                    output_kind: str, label: str) -> Comparison:
    """Run both polygraphy runners on the batches and check `candidate` against `reference`."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    if precision not in TOLERANCES:
        raise CompareError(f"unknown precision {precision!r} ({', '.join(TOLERANCES)})")
    quiet_polygraphy()
    tol = TOLERANCES[precision]
    feeds = [{input_name: b} for b in batches.arrays]
    results = Comparator.run([candidate, reference], data_loader=feeds)
    ref_out = results[reference.name]
    outputs = list(ref_out[0].keys())
    scale = max(1.0, max(float(np.max(np.abs(it[o]))) for it in ref_out for o in outputs))
    atol = tol.tol * scale
    func = SimpleCompareFunc(atol=atol, rtol=tol.tol, check_error_stat=tol.stat)
    accuracy = Comparator.compare_accuracy(results, compare_func=func)
    per_iteration = accuracy[0][(candidate.name, reference.name)]
    checks, stats = [], {}
    for out in outputs:
        s = _stat_summary(per_iteration, out, tol.stat)
        stats[out] = s
        ok = s["iterations_passed"] == s["iterations"]
        checks.append(ParityCheck(
            f"{label} {precision} vs ONNX Runtime ({out}, polygraphy {tol.stat} error)",
            s["checked_value"], atol, ok,
            f"{tol.stat} |diff| = {s['checked_value']:.3g} (max {s['max_absdiff']:.3g}, max "
            f"relative {s['max_reldiff']:.3g}), bound atol {tol.tol:.3g} x max(1, max|ref| = "
            f"{scale:.3g}) = {atol:.3g} or rtol {tol.tol:.3g}; {s['iterations_passed']}/"
            f"{s['iterations']} batches within",
        ))
    if precision == "int8":
        ref = _gather(ref_out, outputs[0], batches.valid)
        got = _gather(results[candidate.name], outputs[0], batches.valid)
        name = f"{label} int8 vs ONNX Runtime"
        checks.append(cosine_check(name, ref, got, INT8_MIN_COSINE) if output_kind == "features"
                      else top1_agreement_check(name, ref, got, INT8_MIN_AGREEMENT))
    report = {
        "tool": "polygraphy",
        "polygraphy_version": _polygraphy_version(),
        "runners": {"candidate": candidate.name, "reference": reference.name},
        "precision": precision,
        "tolerance": {"check_error_stat": tol.stat, "tol": tol.tol, "atol": atol,
                      "rtol": tol.tol, "reference_scale": scale},
        "inputs": batches.count,
        "batches": [int(b.shape[0]) for b in batches.arrays],
        "outputs": stats,
        "passed": all(c.passed for c in checks),
    }
    return Comparison(checks, report)


def _polygraphy_version() -> str:
    import polygraphy

    return polygraphy.__version__
