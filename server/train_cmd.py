"""Pre-train an SDRnet (or, with --unified, the unified baseline) into a run directory.

Phases: SimSiam on all data (the teacher), residual k-means codes, then one progressive SiamKD
phase per routing level, the signature kit and the report. Rerunning the same command after a
crash resumes from the last checkpoint (or, when that one is corrupt, the one before it;
`--restart` starts over when none verifies). Under `torchrun` it trains with DDP (NCCL on CUDA,
gloo on CPU).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="SOURCE",
                        help="builtin:digits, fashion-mnist[:train|:test] or an image folder "
                             "(default: [data] source of the config)")
    parser.add_argument("--config", required=True, type=Path, metavar="CONFIG.toml",
                        help="training config, e.g. configs/tiny.toml")
    parser.add_argument("--out", required=True, type=Path, metavar="RUN_DIR",
                        help="run directory to create (or to resume)")
    parser.add_argument("--unified", action="store_true",
                        help="train the unified baseline (one backbone, SimSiam, same epochs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="override [train] device")
    parser.add_argument("--seed", type=int, help="override [train] seed")
    parser.add_argument("--restart", action="store_true",
                        help="discard RUN_DIR's own checkpoints (e.g. when none verifies) and "
                             "train the same run again from the start")


QUIET_LOGGERS = ("faiss", "onnx_ir", "onnxscript")  # chatty at INFO; -v shows them


def run(args: argparse.Namespace) -> int:
    from sdr_edge.training import ConfigError, RunConflictError, load_config, train
    from sdr_edge.training.checkpoint import CheckpointError

    if not getattr(args, "verbose", False):
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    overrides = {"train": {"device": args.device, "seed": args.seed}, "data": {"source": args.data}}
    try:
        cfg = load_config(args.config, overrides)
        result = train(cfg, args.out, unified=args.unified, restart=args.restart)
    except (ConfigError, RunConflictError, CheckpointError) as exc:
        raise CommandError(str(exc)) from None
    if result.rank != 0:
        return 0
    if result.already_done:
        print(f"{result.run_dir}: this {result.kind} run is already complete; nothing to do")
    else:
        how = "resumed and finished" if result.resumed else "finished"
        print(f"{result.kind} run {how} in {result.seconds:.1f} s: {result.run_dir} "
              f"({result.num_images} images)")
    print(f"skipped {result.skipped_images} unreadable image file(s)"
          + (" (paths in metrics.jsonl)" if result.skipped_images else ""))
    sys.stdout.flush()
    return 0
