"""The layering rule: apps (server/, client/, export/) import only the library `sdr_edge` and
third-party packages, never each other; `sdr_edge` imports no app. An app has two names, its
folder's (`server`: the repository's layout) and its installed one (`sdr_edge_server`, pyproject's
package-dir); both count, and an app reaches its own modules only by relative imports, the one
spelling that works under either name.

Every import is checked, at any depth (inside functions too, where lazy imports live), and
module names handed to `importlib.import_module` / `importlib.util.find_spec` as string
constants are checked as well, since the CLIs' command tables work that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPS = ("server", "client", "export")
LIBRARY = "sdr_edge"
DYNAMIC_IMPORTERS = {"import_module", "find_spec", "__import__"}
INSTALLED = {f"sdr_edge_{app}": app for app in APPS}  # installed name -> app folder


def app_of(module: str) -> str:
    """The app a module name belongs to under either of its names, or "" for any other."""
    top = module.split(".", 1)[0]
    return INSTALLED.get(top, top if top in APPS else "")


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
        app = app_of(module)
        if not app or app == owner:
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
    ("server/cli.py", "from sdr_edge_client.cli import main\n", 1),
    ("sdr_edge/federated/x.py", "import os\nimport sdr_edge_server.registry.app\n", 2),
    ("export/cli.py", "import importlib.util\nimportlib.util.find_spec('sdr_edge_client.x')\n", 2),
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


def absolute_self_imports(source: str, relpath: str) -> list[str]:
    """'file:line: message' for each absolute import an app makes of its own modules.

    `server.x` breaks the installed wheel (there it is `sdr_edge_server.x`), `sdr_edge_server.x`
    breaks a checkout (the repository layout); `from .x import` works in both.
    """
    owner = relpath.replace("\\", "/").split("/", 1)[0]
    if owner not in APPS:
        return []
    return [f"{relpath}:{line}: app {owner}/ imports its own module {module!r} by an absolute "
            "name (use a relative import, or __package__ for a module name in a string)"
            for line, module in imported_modules(ast.parse(source, filename=relpath))
            if app_of(module) == owner]


def test_apps_import_their_own_modules_relatively():
    found = []
    for path in _project_files():
        rel = path.relative_to(ROOT).as_posix()
        found += absolute_self_imports(path.read_text(encoding="utf-8"), rel)
    assert not found, "absolute self-import:\n" + "\n".join(found)


@pytest.mark.parametrize(("relpath", "source", "bad"), [
    ("server/serve_cmd.py", "from server.registry.app import create_app\n", 1),
    ("server/serve_cmd.py", "def f():\n    import sdr_edge_server.registry.auth\n", 1),
    ("client/cli.py", "import importlib\nimportlib.import_module('client.fetch_cmd')\n", 1),
    ("server/serve_cmd.py", "from .registry.app import create_app\nfrom . import cli\n", 0),
    ("client/cli.py", "COMMANDS = {'fetch': f'{__package__}.fetch_cmd'}\n", 0),
    ("tests/test_x.py", "from sdr_edge_server.cli import main\n", 0),
])
def test_the_self_import_check(relpath, source, bad):
    assert len(absolute_self_imports(source, relpath)) == bad


# -- export / inference layering ----------------------------------------------------------------
# The device path (`sdr_edge.inference`) reads the model metadata that `sdr_edge.export` writes;
# both take it from `sdr_edge.artifacts.model_metadata`, so inference never imports export (which
# would drag torch and onnx onto a device). Export may use inference's runners: its parity checks
# run the exported model through the very runtime code a device runs.
def library_imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The `sdr_edge` modules that `module`'s source imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            # `from pkg import sub` may name a submodule: count both spellings
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        out.update(n for n in names if n.split(".", 1)[0] == LIBRARY)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (any depth, lazy ones too)."""
    files = {}
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        is_package = rel.endswith(".__init__")
        files[rel.removesuffix(".__init__")] = (path, is_package)
    graph = {}
    for module, (path, is_package) in files.items():
        imported = library_imports(path.read_text(encoding="utf-8"), module, is_package)
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in the graph (first module repeated at the end), or [] when none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def package_imports(package: str) -> dict[str, set[str]]:
    """module of `package` -> every `sdr_edge` module it imports (any depth, lazy ones too)."""
    out = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        is_package = module.endswith(".__init__")
        module = module.removesuffix(".__init__")
        out[module] = library_imports(path.read_text(encoding="utf-8"), module, is_package)
    return out


def test_inference_never_imports_export_and_its_modules_form_no_cycle():
    inference = import_graph(ROOT, "sdr_edge.inference")
    assert {"sdr_edge.inference.runners", "sdr_edge.inference.trt_runner",
            "sdr_edge.inference.base"} <= set(inference)  # the walk really sees the package
    into_export = [f"{module} imports {name}"
                   for module, names in package_imports("sdr_edge.inference").items()
                   for name in sorted(names)
                   if name == "sdr_edge.export" or name.startswith("sdr_edge.export.")]
    assert not into_export, "inference imports export:\n" + "\n".join(into_export)
    assert find_cycle(inference) == [], "import cycle in sdr_edge/inference"
    # export -> inference is the allowed direction; the graph sees it (so the check is live)
    assert any(name.startswith("sdr_edge.inference.")
               for names in package_imports("sdr_edge.export").values() for name in names)


def test_the_layering_checks_catch_a_cycle_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    src = "def f():\n    from ..export import pipeline\n    from .base import Runner\n"
    found = library_imports(src, "sdr_edge.inference.runners")
    assert {"sdr_edge.export.pipeline", "sdr_edge.inference.base"} <= found
    assert library_imports("from . import base\n", "sdr_edge.inference", is_package=True) == {
        "sdr_edge.inference", "sdr_edge.inference.base"}
