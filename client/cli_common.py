"""A tiny sub-command dispatcher shared by the three programs.

Each sub-command module defines `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their command runs, so `sdr-client signature` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "httpx")


class CommandError(Exception):
    """An error to show the user as one line, with exit status 2."""


def load_key_arg(path, flag: str, private: bool = False):
    """An Ed25519 key named on the command line, or a one-line CommandError naming the flag."""
    from sdr_edge.artifacts.signing import SignatureError, load_private_key, load_public_key

    if not path.is_file():
        raise CommandError(f"{flag} file not found: {path}")
    try:
        return load_private_key(path) if private else load_public_key(path)
    except (SignatureError, ValueError) as exc:
        raise CommandError(f"{flag} {path}: {exc}") from exc


def available(commands: dict[str, str]) -> dict[str, str]:
    return {name: mod for name, mod in commands.items() if importlib.util.find_spec(mod) is not None}


def run_cli(prog: str, description: str, commands: dict[str, str], argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = available(commands)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported (keeps torch out of light commands).
    chosen = next((a for a in argv if a in commands), None)
    for name, module_name in commands.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                               description=module.__doc__)
            module.add_arguments(p)
            p.set_defaults(_module=module)
        else:
            sub.add_parser(name, add_help=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the ONNX exporter narrates every graph pass at INFO
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args._module.run(args) or 0)
    except CommandError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
