"""`sdr-server`: train, report, shards, serve, keygen, token, route-eval, bench. Each sub-command lives in its own module."""

from __future__ import annotations

from sdr_edge.cli import run_cli

# Module names from this package's own name: `server.x` when run from the repository
# (the Flower FAB's layout), `sdr_edge_server.x` when installed.
COMMANDS = {
    "train": f"{__package__}.train_cmd",
    "keygen": f"{__package__}.keygen_cmd",
    "token": f"{__package__}.token_cmd",
    "serve": f"{__package__}.serve_cmd",
    "route-eval": f"{__package__}.route_eval_cmd",
    "report": f"{__package__}.report_cmd",
    "bench": f"{__package__}.bench_cmd",
    "fleet-keys": f"{__package__}.fleet_cmd",
    "shards": f"{__package__}.shards_cmd",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-server", "SDR server: pre-train, serve sub-nets, evaluate routing.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
