"""A tiny sub-command dispatcher shared by the three programs (sdr-server, sdr-client, sdr-export).

Each sub-command module defines `add_arguments(parser)` and `run(args) -> int`; only the chosen
command's module is imported, so `sdr-client signature` never imports torch. The one-line
summaries `--help` lists come from each module's docstring, read from its source with `ast`
without importing it.

Error rule: a `SdrEdgeError` (this project's "show the user one line" errors, `CommandError`
among them) or a missing input file (`FileNotFoundError`) is printed as
`prog command: error: message` with exit status 2. So is a missing third-party package that
one of the wheel's extras installs (`EXTRA_OF`): the line names the package and the
`pip install 'sdr-edge[extra]'` that brings it. Anything else is a bug and keeps its traceback.
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


# Import name -> the extra of pyproject's [project.optional-dependencies] that installs it (test:
# test_cli_plumbing.py reads pyproject). Where several extras hold a package, the one named
# is the smallest that runs the commands importing it: torch -> export (`sdr-client prune`,
# `sdr-export onnx`; `fetch --rerank` names its own, smaller extra before anything runs).
EXTRA_OF = {
    "torch": "export",
    "safetensors": "rerank",
    "sklearn": "rerank",
    "threadpoolctl": "rerank",
    "onnx": "export",
    "onnxscript": "export",
    "onnxconverter_common": "export",
    "torch_pruning": "export",
    "polygraphy": "export",
    "scipy": "server",
    "faiss": "server",
    "matplotlib": "server",
    "tomli_w": "server",
    "PIL": "server",
    "fontTools": "server",
    "fastapi": "server",
    "pydantic": "server",
    "uvicorn": "server",
    "flwr": "federated",
    "tensorrt": "trt",
    "cuda": "trt",
}


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
    try:  # the chosen command's module is imported here: its top-level imports may be missing
        args = build_parser(prog, description, commands, chosen).parse_args(argv)
    except ModuleNotFoundError as exc:
        if (message := missing_extra_message(exc)) is None:
            raise
        print(f"{prog} {chosen}: error: {message}", file=sys.stderr)
        return 2
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
    except ModuleNotFoundError as exc:
        if (message := missing_extra_message(exc)) is None:
            raise
        print(f"{prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a None or spec-less entry in sys.modules
        return False


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """The one line for a package an extra installs, or None (a bug: keep the traceback).

    Only a missing top-level package counts: a missing submodule of an installed package is a
    version mismatch or a bug, which one line would hide.
    """
    top = (exc.name or "").split(".", 1)[0]
    extra = EXTRA_OF.get(top)
    if extra is None or (top != exc.name and _installed(top)):
        return None
    return (f"this command needs {top}, which is in the '{extra}' extra: "
            f"pip install 'sdr-edge[{extra}]'")
