"""Frames/s of `sdr-client infer --video` on a generated video: batch 1 vs 8, fp32 vs int8,
raw-input vs normalised-input graph, CPU execution provider.

Model: the `small` backbone preset (widths 16-32-64-128) with a 10-class head at 28 x 28 x 1,
trained briefly on Fashion-MNIST, exported four ways through `sdr_edge.export.pipeline` (the
checks of `sdr-export onnx`): fp32 and int8 (CPU U8S8), each with the normalised float NCHW
input of today and with `--raw-input` (uint8 NHWC, normalised in the graph). Video: Fashion-MNIST
test images upscaled to 64 x 64 BGR frames, MJPG in .avi (what a camera or a file gives:
decode, colour conversion and resize are in the path).

Timing: `sdr_edge.inference.video.infer_video`, the code `sdr-client infer --video` runs,
end to end (decode + preprocess + model) and in the model alone; every configuration once per
round, in a shuffled order per round, so the load of a shared machine hits all alike; medians
over rounds, ratios from the same run. A decode-only pass gives the ceiling the video itself
sets. One ONNX Runtime thread (`--threads`).

    nice .venv/bin/python benchmarks/video_infer.py [--quick] [--frames 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from small_classifier import SIZE, train_small_classifier  # benchmarks/, beside this file

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.data.sources import load_source
from sdr_edge.export.parity import ParityError
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.inference.runners import OrtRunner
from sdr_edge.inference.video import infer_video, iter_frames, open_capture
from sdr_edge.models import SubnetModel

FRAME = 64
BATCHES = (1, 8)


def write_video(path: Path, frames: int, seed: int) -> Path:
    """Fashion-MNIST test images as FRAME x FRAME BGR frames, MJPG in .avi."""
    src = load_source("fashion-mnist:test", SIZE, 1, limit=frames, seed=seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (FRAME, FRAME))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG video here")
    for image in src.images:
        big = cv2.resize(image[:, :, 0], (FRAME, FRAME), interpolation=cv2.INTER_LINEAR)
        writer.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def export_all(model: SubnetModel, spec: InputSpec, work: Path) -> tuple[dict, dict]:
    """fp32/int8 x normalised/raw ONNX files, and each export's check results."""
    paths, checks = {}, {}
    for precision in ("fp32", "int8"):
        for raw in (False, True):
            name = f"{precision}_{'raw' if raw else 'normalised'}"
            opts = ExportOptions(precision=precision, calib_source="fashion-mnist:train",
                                 calib_limit=256, eval_source="fashion-mnist:test",
                                 eval_limit=500, raw_input=raw, progress=False)
            out = work / f"{name}.onnx"
            try:
                res = export_model(model, spec, (0,), out, opts)
                checks[name] = {"passed": True, "checks": [c.describe() for c in res.checks]}
            except ParityError as exc:  # still time it, and say that its bound was missed
                opts.tolerance = 0.0
                res = export_model(model, spec, (0,), out, opts)
                checks[name] = {"passed": False, "checks": [c.describe() for c in exc.checks]}
            paths[name] = out
    return paths, checks


def decode_only(video: Path) -> float:
    """Frames/s of reading the video alone (the ceiling for every configuration)."""
    t0 = time.perf_counter()
    cap = open_capture(str(video))
    n = sum(1 for _ in iter_frames(cap))
    cap.release()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller training run, fewer frames")
    ap.add_argument("--frames", type=int, default=None, help="frames in the video")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_train, epochs = (3000, 1) if args.quick else (8000, 2)
    frames = args.frames or (200 if args.quick else 500)
    rounds = args.rounds or (3 if args.quick else 7)
    t_start = time.time()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()
    model, spec = train_small_classifier(n_train, epochs, args.seed)
    result: dict = {
        "benchmark": "video_infer",
        "model": {"backbone": "small preset (widths 16-32-64-128)", "input": f"{SIZE}x{SIZE}x1",
                  "params": sum(p.numel() for p in model.parameters()),
                  "trained_on": f"fashion-mnist:train ({n_train} images, {epochs} epoch(s))"},
        "video": {"frames": frames, "frame": f"{FRAME}x{FRAME} BGR", "codec": "MJPG .avi"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ort_threads": args.threads, "onnxruntime": ort.__version__,
                    "provider": "CPUExecutionProvider",
                    "load_avg_before": [round(v, 2) for v in load_before]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = write_video(work / "clip.avi", frames, args.seed)
        paths, checks = export_all(model, spec, work)
        result["export_checks"] = checks
        runners = {name: OrtRunner(p, threads=args.threads, provider="cpu")
                   for name, p in paths.items()}
        configs = [(name, b) for name in runners for b in BATCHES]
        e2e: dict = {c: [] for c in configs}
        in_model: dict = {c: [] for c in configs}
        labels: dict = {}
        decode: list[float] = []
        rng = random.Random(args.seed)
        for _ in range(rounds):
            decode.append(decode_only(video))
            rng.shuffle(configs)
            for name, b in configs:
                got: list[int] = []
                rep = infer_video(runners[name], str(video), batch=b,
                                  on_frame=lambda f, got=got: got.append(f.index))
                e2e[(name, b)].append(rep.frames_per_s)
                in_model[(name, b)].append(rep.model_frames_per_s)
                labels[(name, b)] = np.asarray(got)
    med = {c: statistics.median(v) for c, v in e2e.items()}
    med_model = {c: statistics.median(v) for c, v in in_model.items()}
    table = {}
    for name in paths:
        for b in BATCHES:
            table[f"{name}_batch{b}"] = {"frames_per_s": round(med[(name, b)], 1),
                                         "model_frames_per_s": round(med_model[(name, b)], 1)}
    ratios = {}
    for b in BATCHES:
        for layout in ("normalised", "raw"):
            ratios[f"int8_over_fp32_{layout}_batch{b}"] = round(
                med[(f"int8_{layout}", b)] / med[(f"fp32_{layout}", b)], 3)
        for precision in ("fp32", "int8"):
            ratios[f"raw_over_normalised_{precision}_batch{b}"] = round(
                med[(f"{precision}_raw", b)] / med[(f"{precision}_normalised", b)], 3)
    for name in paths:
        ratios[f"batch8_over_batch1_{name}"] = round(med[(name, 8)] / med[(name, 1)], 3)
    result["frames_per_s_median"] = table
    result["decode_only_frames_per_s"] = round(statistics.median(decode), 1)
    result["ratios_end_to_end"] = ratios
    ref = labels[("fp32_normalised", 1)]
    result["label_agreement_with_fp32_normalised_batch1"] = {
        f"{n}_batch{b}": round(float((labels[(n, b)] == ref).mean()), 4) for n, b in labels}
    result["rounds"] = rounds
    result["machine"]["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
