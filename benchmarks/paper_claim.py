"""The paper's claim, measured: `python benchmarks/paper_claim.py [--budget cpu|full|minute]
[--seeds N] [--task-set fashion|domains] [--pool SOURCE]`.

Same as `sdr-server bench`: routed sub-nets vs the unified model, the phase-0 teacher, R random
routes and the lowest-scored route, as mean ± 95 % interval over N seeds; prints the verdict
JSON last (see sdr_edge/bench/paper_claim.py).
"""

from __future__ import annotations

import sys

from sdr_edge_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
