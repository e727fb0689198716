"""Latency of PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (and TensorRT on a GPU).

Model: the `small` backbone preset (widths 16-32-64-128, one basic block per stage) with a
10-class head at 28 x 28 x 1, trained briefly on Fashion-MNIST so that the int8 accuracy
bound (top-1 agreement >= 99% with fp32, accuracy drop <= 1 point on fashion-mnist:test) is
measured on a real classifier. The exports go through `sdr_edge.export.pipeline`, i.e. the
same checks as `sdr-export onnx`.

Timing: all runtimes on the same preprocessed test images, same thread count, interleaved
repetitions (each round calls every runtime once, in a shuffled order, so load on a shared
machine hits all of them alike); medians in milliseconds per batch, and ratios from the same
run. `--variants` also times int8 settings (per-tensor weights, signed activations as for
TensorRT, ORT basic graph optimisation) to show what moves int8 latency.

Targets (CPU): ORT fp32 <= PyTorch eager at batch 1; ORT int8 <= 0.7 x ORT fp32 at batch 32.

    nice .venv/bin/python benchmarks/export_latency.py [--quick] [--variants] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from small_classifier import SIZE, train_small_classifier  # benchmarks/, beside this file
from tqdm import tqdm

from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.export.parity import ParityError
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.export.quantize import quantize_int8
from sdr_edge.inference.runners import OrtRunner
from sdr_edge.models import SubnetModel


def fp32_test_accuracy(model: SubnetModel, spec: InputSpec, seed: int) -> float:
    """Top-1 of the fp32 PyTorch model on 2,000 fashion-mnist:test images."""
    test = load_source("fashion-mnist:test", SIZE, 1, limit=2000, seed=seed)
    with torch.inference_mode():
        pred = model(torch.from_numpy(normalize_batch(test.images, spec))).argmax(1).numpy()
    return float((pred == test.labels).mean())


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int, warmup: int,
                      desc: str) -> dict[str, list[float]]:
    """ms per call, `reps` each; every round calls each fn once in a shuffled order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in tqdm(range(reps), desc=desc, file=sys.stderr, leave=False):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summarise(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Medians (the reported figure) and minima (the least disturbed call on a busy machine)."""
    return ({k: round(statistics.median(v), 4) for k, v in times.items()},
            {k: round(min(v), 4) for k, v in times.items()})


def cpu_section(model: SubnetModel, paths: dict[str, Path], x: np.ndarray, threads: int,
                reps: int, variants: dict[str, Path]) -> dict:
    torch.set_num_threads(threads)
    runners = {name: OrtRunner(p, threads=threads, require_metadata=False)
               for name, p in {**paths, **variants}.items()}
    runners["ort_fp32_basic_opt"] = OrtRunner(paths["ort_fp32"], threads=threads,
                                              require_metadata=False, optimization="basic")
    runners["ort_int8_basic_opt"] = OrtRunner(paths["ort_int8"], threads=threads,
                                              require_metadata=False, optimization="basic")
    out = {}
    for batch in (1, 32):
        xb = np.ascontiguousarray(x[:batch])
        tb = torch.from_numpy(xb)

        def eager(tb=tb):
            with torch.inference_mode():
                return model(tb)

        fns: dict[str, Callable[[], object]] = {"torch_eager": eager}
        for name, r in runners.items():
            fns[name] = lambda r=r, xb=xb: r.run_batch(xb)
        med, low = summarise(interleaved_times(fns, reps if batch == 1 else max(reps // 2, 30),
                                               5, f"batch {batch}"))
        out[f"batch_{batch}"] = {
            "median_ms": med,
            "min_ms": low,
            "ort_fp32_over_torch": round(med["ort_fp32"] / med["torch_eager"], 3),
            "ort_int8_over_ort_fp32": round(med["ort_int8"] / med["ort_fp32"], 3),
            "ort_int8_over_torch": round(med["ort_int8"] / med["torch_eager"], 3),
            **{f"{k}_over_ort_fp32": round(med[k] / med["ort_fp32"], 3)
               for k in med if k.startswith("int8_")},
        }
    return out


def gpu_section(model: SubnetModel, spec: InputSpec, x: np.ndarray, workdir: Path,
                calib: str, eval_source: str, reps: int) -> dict:
    """PyTorch (CUDA) vs TensorRT fp16/int8 engines, when TensorRT and a GPU are present."""
    from sdr_edge.export.tensorrt_build import BuildOptions, build_and_verify
    from sdr_edge.inference.cuda_device import find_nvidia_gpu, tensorrt_module
    from sdr_edge.inference.trt_runner import TrtRunner

    trt, err = tensorrt_module()
    gpu, note = find_nvidia_gpu()
    if trt is None or gpu is None or not torch.cuda.is_available():
        return {"skipped": f"needs TensorRT, an NVIDIA GPU and CUDA torch ({err or note or 'no CUDA torch'})"}
    engines = {}
    for precision in ("fp16", "int8"):
        onnx_path = workdir / f"gpu_{precision}.onnx"
        export_model(model, spec, (0,), onnx_path, ExportOptions(
            precision=precision, calib_source=calib if precision == "int8" else None,
            eval_source=eval_source, eval_limit=1000, int8_target="tensorrt", progress=False))
        engine = workdir / f"gpu_{precision}.engine"
        build_and_verify(BuildOptions(onnx=onnx_path, out=engine, max_batch=32))
        engines[f"tensorrt_{precision}"] = TrtRunner(engine)
    cuda_model = model.cuda().half().eval()
    out = {"gpu": gpu.to_dict(), "tensorrt_version": trt.__version__}
    for batch in (1, 32):
        xb = np.ascontiguousarray(x[:batch])
        tb = torch.from_numpy(xb).cuda().half()

        def eager(tb=tb):
            with torch.inference_mode():
                y = cuda_model(tb)
            torch.cuda.synchronize()
            return y

        fns: dict[str, Callable[[], object]] = {"torch_cuda_fp16": eager}
        for name, r in engines.items():
            fns[name] = lambda r=r, xb=xb: r.run_batch(xb)  # includes host<->device copies
        med, low = summarise(interleaved_times(fns, reps, 10, f"gpu batch {batch}"))
        out[f"batch_{batch}"] = {"median_ms": med, "min_ms": low, **{
            f"{k}_over_torch": round(med[k] / med["torch_cuda_fp16"], 3) for k in engines}}
    for r in engines.values():
        r.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller training run and fewer reps")
    ap.add_argument("--variants", action="store_true", help="also time int8 variants")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and ORT")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_train, epochs = (6000, 2) if args.quick else (12000, 3)
    reps = args.reps or (60 if args.quick else 200)
    t0 = time.time()
    torch.set_num_threads(args.threads)  # small convolutions: extra threads mostly contend
    model, spec = train_small_classifier(n_train, epochs, args.seed)
    acc = fp32_test_accuracy(model, spec, args.seed)
    calib, eval_source = "fashion-mnist:train", "fashion-mnist:test"
    result: dict = {
        "benchmark": "export_latency",
        "model": {"backbone": "small preset (widths 16-32-64-128, blocks 1-1-1-1)",
                  "input": f"{SIZE}x{SIZE}x1", "classes": 10,
                  "params": sum(p.numel() for p in model.parameters()),
                  "trained_on": f"fashion-mnist:train ({n_train} images, {epochs} epochs)",
                  "fp32_test_accuracy": round(acc, 4)},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths, checks, bound_met = {}, {}, True
        for precision in ("fp32", "int8"):
            out = work / f"{precision}.onnx"
            opts = ExportOptions(precision=precision, calib_source=calib, calib_limit=512,
                                 eval_source=eval_source, eval_limit=2000, progress=False)
            try:
                res = export_model(model, spec, (0,), out, opts)
                checks[precision] = [c.describe() for c in res.checks]
                if precision == "int8":
                    result["int8_settings"] = res.metadata.extra["int8"]
            except ParityError as exc:
                if precision == "fp32":
                    raise
                # Report the miss with its numbers, and still time the quantized model.
                bound_met = False
                checks[precision] = [c.describe() for c in exc.checks]
                cal = normalize_batch(load_source(calib, SIZE, 1, limit=512).images, spec)
                result["int8_settings"] = quantize_int8(work / "fp32.onnx", out, cal, "input",
                                                        workdir=work)
            paths[f"ort_{precision}"] = out
        result["export_checks"] = checks
        test = load_source(eval_source, SIZE, 1, limit=64, seed=args.seed)
        x = normalize_batch(test.images, spec)
        variants = {}
        if args.variants:
            fp32 = paths["ort_fp32"]
            cal = normalize_batch(load_source(calib, SIZE, 1, limit=512).images, spec)
            for name, kw in {"int8_per_tensor": {"per_channel": False},
                             "int8_all_layers": {"keep_first_last_fp32": False},
                             "int8_s8s8_tensorrt_form": {"target": "tensorrt"}}.items():
                variants[name] = work / f"{name}.onnx"
                quantize_int8(fp32, variants[name], cal, "input", workdir=work, **kw)
        result["cpu"] = cpu_section(model, paths, x, args.threads, reps, variants)
        b1, b32 = result["cpu"]["batch_1"], result["cpu"]["batch_32"]
        result["targets"] = {
            "ort_fp32_not_slower_than_torch_at_batch_1": b1["ort_fp32_over_torch"] <= 1.0,
            "ort_int8_at_most_0.7x_fp32_at_batch_32": b32["ort_int8_over_ort_fp32"] <= 0.7,
            "int8_accuracy_bound_met": bound_met,
        }
        result["gpu"] = gpu_section(model, spec, x, work, calib, eval_source, reps)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
