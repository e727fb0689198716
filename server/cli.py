"""`sdr-server`: train, serve, keygen, token, route-eval, bench. Each sub-command lives in its own module."""

from __future__ import annotations

from sdr_edge.cli import run_cli

COMMANDS = {
    "train": "server.train_cmd",
    "keygen": "server.keygen_cmd",
    "token": "server.token_cmd",
    "serve": "server.serve_cmd",
    "route-eval": "server.route_eval_cmd",
    "bench": "server.bench_cmd",
    "fleet-keys": "server.fleet_cmd",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-server", "SDR server: pre-train, serve sub-nets, evaluate routing.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
