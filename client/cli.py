"""`sdr-client`: signature, fetch, prune, finetune, agent, infer."""

from __future__ import annotations

from sdr_edge.cli import run_cli

# Module names from this package's own name (repository layout or installed name).
COMMANDS = {
    "signature": f"{__package__}.signature_cmd",
    "fetch": f"{__package__}.fetch_cmd",
    "prune": f"{__package__}.prune_cmd",
    "agent": f"{__package__}.agent_cmd",
    "infer": f"{__package__}.infer_cmd",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-client", "SDR edge client: describe local data, fetch and run a sub-net.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
