"""On-device agent: signature, verified sub-net, join the federation, keep the fine-tuned bundle.

Reads agent.toml (see docs/federation.md): the data folder, the registry's URL, token and
public key, and the SuperLink's address with its TLS and authentication files. Each step is
logged and recorded in STATE_DIR/agent-state.json; after a crash, running the same command
again skips the steps already done.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="agent.toml")
    parser.add_argument("--restart", action="store_true",
                        help="forget the recorded state and run every step again")


def _raise_on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt("SIGTERM")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.registry_client import RegistryError

    from .agent import Agent, AgentConfig, AgentError

    logging.getLogger("sdr_edge").setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # stop cleanly on SIGTERM too
    try:
        cfg = AgentConfig.load(args.config)
        bundle = Agent(cfg, restart=args.restart).run()
    except (AgentError, RegistryError) as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt:
        logging.getLogger("sdr_edge.agent").warning("stopped; run the same command to resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if bundle is not None:
        print(bundle)
    return 0
