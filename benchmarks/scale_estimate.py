"""Host memory and disk of a training run at scale, computed from a config (no training).

Prints JSON: every term of `sdr_edge.training.estimate.ResourceEstimate` in bytes, the per-rank
and rank-0 peaks, and the comment block configs/imagenet.toml carries (a test checks they agree).

    .venv/bin/python benchmarks/scale_estimate.py --config configs/imagenet.toml \
        --images 1281167 --world 8 [--mean-file-bytes 110000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from sdr_edge.training.config import load_config
from sdr_edge.training.estimate import comment_block, estimate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--images", type=int, required=True, help="files in the folder")
    ap.add_argument("--world", type=int, default=1, help="ranks (torchrun processes)")
    ap.add_argument("--mean-file-bytes", type=int, default=110_000)
    ap.add_argument("--path-bytes", type=int, default=32)
    args = ap.parse_args()
    e = estimate(load_config(args.config), args.images, args.world,
                 mean_file_bytes=args.mean_file_bytes, path_bytes=args.path_bytes)
    out = {**dataclasses.asdict(e), "per_rank": e.per_rank, "rank0": e.rank0,
           "comment": comment_block(e).splitlines()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
