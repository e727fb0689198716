"""The paper's claim, measured: `python benchmarks/paper_claim.py [--budget cpu|full|minute]`.

Same as `sdr-server bench`; prints the verdict JSON last (see sdr_edge/bench/paper_claim.py).
"""

from __future__ import annotations

import sys

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
