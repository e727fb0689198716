"""Write a Triton Inference Server model repository entry (config.pbtxt, labels) for an ONNX model.

`REPO/<name>/<version>/model.onnx` plus `REPO/<name>/config.pbtxt` for the ONNX Runtime backend,
with the inputs and outputs read from the graph, the label file from the model's metadata, an
instance group and optional dynamic batching. Other models in REPO are left alone; an existing
version is replaced only with --force, and only if sdr-edge wrote it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--preferred-batch takes sizes like 4,8, not "
                                         f"{value!r}") from None
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, type=Path, help="model.onnx from `sdr-export onnx`")
    p.add_argument("--out", required=True, type=Path, help="model repository folder (REPO)")
    p.add_argument("--name", help="model name, the folder under REPO (default: the ONNX stem)")
    p.add_argument("--version", type=int, default=1, help="model version folder (>= 1)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="max_batch_size (default 8 for a dynamic batch axis, 0 for a fixed one)")
    p.add_argument("--dynamic-batching", action="store_true",
                   help="let Triton group requests into batches")
    p.add_argument("--preferred-batch", type=_sizes, default=None, metavar="N,N",
                   help="dynamic batching's preferred sizes (default powers of two up to max)")
    p.add_argument("--max-queue-delay-us", type=int, default=100,
                   help="how long dynamic batching waits to fill a batch (microseconds)")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group)")
    p.add_argument("--kind", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where instances run (KIND_AUTO: a GPU when Triton has one)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing version that sdr-edge wrote")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.export.triton import TritonOptions, export_triton

    opts = TritonOptions(
        name=args.name, version=args.version, max_batch=args.max_batch,
        dynamic_batching=args.dynamic_batching, preferred_batch=args.preferred_batch,
        max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
        kind=args.kind, force=args.force,
    )
    result = export_triton(args.onnx, args.out, opts)
    labels = f", labels {result.labels_path.name}" if result.labels_path else ""
    print(f"wrote {result.model_path} and {result.config_path} "
          f"(max_batch_size {result.max_batch_size}{labels})")
    return 0
