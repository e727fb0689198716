"""The layering rule: apps (server/, client/, export/) import only the library `sdr_edge` and
third-party packages, never each other; `sdr_edge` imports no app.

Every import is checked, at any depth (inside functions too, where lazy imports live), and
module names handed to `importlib.import_module` / `importlib.util.find_spec` as string
constants are checked as well, since the CLIs' command tables work that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("server", "client", "export")
LIBRARY = "sdr_edge"
DYNAMIC_IMPORTERS = {"import_module", "find_spec", "__import__"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the tree, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if (name in DYNAMIC_IMPORTERS and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)):
                found.append((node.lineno, arg.value))
    return found


def violations(source: str, relpath: str) -> list[str]:
    """'file:line: message' for each import the rule forbids in a file at `relpath`."""
    owner = relpath.replace("\\", "/").split("/", 1)[0]
    if owner not in (*APPS, LIBRARY):
        return []
    out = []
    for line, module in imported_modules(ast.parse(source, filename=relpath)):
        top = module.split(".", 1)[0]
        if top not in APPS or top == owner:
            continue
        who = "the library" if owner == LIBRARY else f"app {owner}/"
        out.append(f"{relpath}:{line}: {who} imports app module {module!r} "
                   f"(apps may import only {LIBRARY} and third-party packages)")
    return out


def _project_files() -> list[Path]:
    return sorted(p for top in (*APPS, LIBRARY) for p in (ROOT / top).rglob("*.py"))


def test_no_app_imports_another_app_and_the_library_imports_no_app():
    files = _project_files()
    assert len(files) > 50  # the walk really covers the tree
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        found += violations(path.read_text(encoding="utf-8"), rel)
    assert not found, "import rule broken:\n" + "\n".join(found)


@pytest.mark.parametrize(("relpath", "source", "line"), [
    ("server/cli.py", "from client.cli_common import run_cli\n", 1),
    ("export/onnx_cmd.py", "import os\n\ndef run():\n    import server.registry.app\n", 4),
    ("sdr_edge/federated/server_flow.py",
     "def f():\n    from client.registry_client import fetch_bundle\n", 2),
    ("client/cli.py", "import importlib\nimportlib.import_module('export.onnx_cmd')\n", 2),
])
def test_the_check_catches_a_cross_app_import(relpath, source, line):
    found = violations(source, relpath)
    assert len(found) == 1 and found[0].startswith(f"{relpath}:{line}: ")


@pytest.mark.parametrize(("relpath", "source"), [
    ("server/cli.py", "from sdr_edge.cli import run_cli\nimport numpy\n"),
    ("client/cli.py", "COMMANDS = {'fetch': 'client.fetch_cmd'}\nimport client.agent\n"),
    ("sdr_edge/cli.py", "from . import errors\nimport importlib\n"),
    ("tests/test_x.py", "from client.cli import main\nfrom server.cli import main\n"),
])
def test_allowed_imports_pass(relpath, source):
    assert violations(source, relpath) == []
