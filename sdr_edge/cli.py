"""A tiny sub-command dispatcher shared by the three programs (sdr-server, sdr-client, sdr-export).

Each sub-command module defines `add_arguments(parser)` and `run(args) -> int`; only the chosen
command's module is imported, so `sdr-client signature` never imports torch. The one-line
summaries `--help` lists come from each module's docstring, read from its source with `ast`
without importing it.

Error rule: a `SdrEdgeError` (this project's "show the user one line" errors, `CommandError`
among them) or a missing input file (`FileNotFoundError`) is printed as
`prog command: error: message` with exit status 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from sdr_edge.errors import SdrEdgeError

NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "httpx")


class CommandError(SdrEdgeError):
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
    """The commands whose module is installed (a device install may lack some)."""
    return {name: mod for name, mod in commands.items()
            if importlib.util.find_spec(mod) is not None}


def command_summary(module_name: str) -> str:
    """The first line of a module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name)
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return ""
    try:
        doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


def build_parser(prog: str, description: str, commands: dict[str, str],
                 chosen: str | None) -> argparse.ArgumentParser:
    """The parser: every command listed with its summary, only `chosen` imported and complete."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in commands.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                               description=module.__doc__)
            module.add_arguments(p)
            p.set_defaults(_module=module)
        else:
            sub.add_parser(name, add_help=False, help=command_summary(module_name))
    return parser


def run_cli(prog: str, description: str, commands: dict[str, str], argv: list[str] | None) -> int:
    """Parse argv, run the chosen command; a SdrEdgeError becomes one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    commands = available(commands)
    chosen = next((a for a in argv if a in commands), None)
    args = build_parser(prog, description, commands, chosen).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the ONNX exporter narrates every graph pass at INFO
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args._module.run(args) or 0)
    except (SdrEdgeError, FileNotFoundError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
