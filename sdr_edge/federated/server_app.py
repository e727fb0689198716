"""The Flower ServerApp: route by the nodes' signatures, FedAvg the sub-net, sign the result.

Configured by `[tool.flwr.app.config]` in pyproject.toml (overridable with
`flwr run --run-config`); the work is in `sdr_edge.federated.server_flow`. Any error ends
the run as failed with a one-line reason (visible in `flwr ls` and the streamed log).
"""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sdr_edge.federated.config import FederationConfig
from sdr_edge.federated.server_flow import run_federation

app = ServerApp()


def _log_to_stdout() -> None:
    """Our modules log through `sdr_edge`; the ServerApp's stdout is what `flwr log` shows."""
    logger = logging.getLogger("sdr_edge")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s sdr_edge: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query signatures, route, fine-tune for the configured rounds, save the signed bundle."""
    _log_to_stdout()
    cfg = FederationConfig.from_run_config(context.run_config)
    summary = run_federation(grid, cfg)
    print(f"sdr-edge: fine-tuned bundle {summary['bundle']} "
          f"(route {summary['route']}, final accuracy {summary['final_accuracy']})")
