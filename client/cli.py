"""`sdr-client`: signature, fetch, prune, finetune, agent, infer."""

from __future__ import annotations

from sdr_edge.cli import run_cli

COMMANDS = {
    "signature": "client.signature_cmd",
    "fetch": "client.fetch_cmd",
    "prune": "client.prune_cmd",
    "agent": "client.agent_cmd",
    "infer": "client.infer_cmd",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-client", "SDR edge client: describe local data, fetch and run a sub-net.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
