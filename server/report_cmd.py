"""Rebuild a run's HTML report (RUN_DIR/report/index.html) from what the run holds now.

Works at any time: on a finished run, on one that is still training (metrics.jsonl is read up
to its last whole line) and on a killed one. It writes nothing into the run but report/, which
it stages under a hidden name and renames into place; the sections other stages added stay.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN_DIR",
                        help="run directory of sdr-server train (finished, running or killed)")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.report import rebuild_training_report
    from sdr_edge.report.html import ReportError

    if not args.run.is_dir():
        raise CommandError(f"run directory not found: {args.run}")
    try:
        index = rebuild_training_report(args.run)
    except (ReportError, OSError) as exc:
        raise CommandError(str(exc).splitlines()[0]) from None
    print(index)
    return 0
