"""Pack an image folder into tar shards (WebDataset layout) with an index for indexed reads.

`sdr-server shards FOLDER --out DIR --shard-size N` writes DIR/shard-000000.tar ... and
DIR/index.json + index.npy; train from them with `--data shards:DIR`. Files are copied byte
for byte, so a run on the shards decodes exactly the images a run on the folder decodes.
DIR is staged in a sibling folder and renamed when complete; an existing non-empty DIR is
refused (this command never deletes what it did not write).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="image folder (class sub-folders give labels)")
    parser.add_argument("--out", required=True, type=Path, help="new or empty folder for shards")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N",
                        help="samples per shard (default 1000)")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.data.shards import write_shards

    doc = write_shards(args.folder, args.out, args.shard_size)
    labels = f", {len(doc['label_names'])} classes" if doc["label_names"] else ", no labels"
    print(f"wrote {doc['count']} images in {len(doc['shards'])} shard(s) to {args.out}{labels}; "
          f"train with --data shards:{args.out}")
    return 0
