"""A missing package that one of the wheel's extras installs is one line naming the extra (exit 2),
and `sdr_edge.cli.EXTRA_OF` agrees with pyproject's [project.optional-dependencies]."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from sdr_edge.cli import EXTRA_OF, run_cli

REPO = Path(__file__).resolve().parents[2]
# Import names whose distribution is not installed here (GPU-only wheels): their PyPI names.
NOT_INSTALLED_DISTS = {"tensorrt": "tensorrt", "cuda": "cuda-python"}

COMMAND_MODULE = '''"""A throwaway command that imports what --missing names, in run()."""
import importlib


def add_arguments(parser):
    parser.add_argument("--missing", required=True)


def run(args):
    importlib.import_module(args.missing)
    return 0
'''


@pytest.fixture()
def throwaway(tmp_path, monkeypatch):
    """A real command module on sys.path, plus one whose top-level import is missing."""
    (tmp_path / "sdr_extras_cmd.py").write_text(COMMAND_MODULE)
    (tmp_path / "sdr_extras_top_cmd.py").write_text(
        '"""Imports a missing package at module level."""\nimport sdr_edge_no_such_pkg_xyz\n\n'
        "def add_arguments(parser):\n    pass\n\n\ndef run(args):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {"prune": "sdr_extras_cmd", "top": "sdr_extras_top_cmd"}
    for name in ("sdr_extras_cmd", "sdr_extras_top_cmd"):
        sys.modules.pop(name, None)


def test_a_blocked_torch_names_the_export_extra(tmp_path):
    """In a fresh interpreter where `import torch` really fails, `prune` prints one line."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())
        from sdr_edge.cli import run_cli
        sys.exit(run_cli("sdr-client", "test", {"prune": "sdr_extras_cmd"},
                         ["prune", "--missing", "torch.nn"]))
    """)
    (tmp_path / "sdr_extras_cmd.py").write_text(COMMAND_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("sdr-client prune: error: this command needs torch, which is in the "
                           "'export' extra: pip install 'sdr-edge[export]'\n")


def test_missing_at_import_time_of_the_command_module(throwaway, monkeypatch, capsys):
    monkeypatch.setitem(EXTRA_OF, "sdr_edge_no_such_pkg_xyz", "server")
    assert run_cli("sdr-server", "test", throwaway, ["top"]) == 2
    assert capsys.readouterr().err == (
        "sdr-server top: error: this command needs sdr_edge_no_such_pkg_xyz, which is in the "
        "'server' extra: pip install 'sdr-edge[server]'\n")


def test_missing_lazy_import_in_run(throwaway, monkeypatch, capsys):
    monkeypatch.setitem(EXTRA_OF, "sdr_edge_no_such_pkg_xyz", "federated")
    argv = ["prune", "--missing", "sdr_edge_no_such_pkg_xyz.sub"]
    assert run_cli("sdr-client", "test", throwaway, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'sdr-edge[federated]'" in err


@pytest.mark.parametrize("missing", [
    "sdr_edge_no_such_pkg_xyz",  # not a package of any extra: a bug, keep the traceback
    "numpy.sdr_no_such_submodule",  # installed package, missing submodule: not an extras matter
    "sdr_edge.no_such_module",  # the project's own module
])
def test_other_missing_modules_keep_their_traceback(throwaway, missing):
    with pytest.raises(ModuleNotFoundError):
        run_cli("prog", "test", throwaway, ["prune", "--missing", missing])


def test_a_missing_submodule_of_a_mapped_installed_package_keeps_its_traceback(throwaway):
    assert "onnx" in EXTRA_OF
    with pytest.raises(ModuleNotFoundError):
        run_cli("prog", "test", throwaway, ["prune", "--missing", "onnx.sdr_no_such_part"])


# -- the map against pyproject ------------------------------------------------------------------
def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(req: str) -> tuple[str, list[str]]:
    """'sdr-edge[rerank]' -> ('sdr-edge', ['rerank']); 'torch>=2.4' -> ('torch', [])."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
    assert m, req
    extras = [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
    return _norm(m.group(1)), extras


def extras_from_pyproject() -> tuple[dict[str, set[str]], set[str]]:
    """extra -> every distribution it installs (nested sdr-edge[...] resolved); core deps."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    own = _norm(project["name"])
    optional = project["optional-dependencies"]

    def resolve(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
        assert extra not in seen, f"extras include each other in a loop: {extra}"
        out = set()
        for req in optional[extra]:
            name, nested = _requirement_name(req)
            if name == own:
                for e in nested:
                    out |= resolve(e, seen | {extra})
            else:
                out.add(name)
        return out

    core = {_requirement_name(r)[0] for r in project["dependencies"]}
    return {extra: resolve(extra) for extra in optional}, core


def distribution_of(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name)
    if dists:
        return _norm(dists[0])
    assert import_name in NOT_INSTALLED_DISTS, f"{import_name}: no installed distribution"
    return NOT_INSTALLED_DISTS[import_name]


def test_every_mapped_extra_exists_and_installs_the_package():
    extras, core = extras_from_pyproject()
    wrong = []
    for import_name, extra in sorted(EXTRA_OF.items()):
        dist = distribution_of(import_name)
        if extra not in extras:
            wrong.append(f"{import_name}: extra {extra!r} is not in pyproject")
        elif dist not in extras[extra]:
            wrong.append(f"{import_name}: {dist} is not installed by the {extra!r} extra")
        if dist in core:
            wrong.append(f"{import_name}: {dist} is a core dependency, not an extra's")
    assert not wrong, "\n".join(wrong)


def test_every_extras_package_the_project_imports_is_mapped():
    """A new `import x` of a package only an extra installs must get a line in EXTRA_OF."""
    extras, core = extras_from_pyproject()
    in_extras = set().union(*extras.values()) - core
    dists = importlib.metadata.packages_distributions()
    unmapped = set()
    for top in ("sdr_edge", "server", "client", "export"):
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top_name = name.split(".", 1)[0]
                    owners = {_norm(d) for d in dists.get(top_name, [])}
                    if owners & in_extras and top_name not in EXTRA_OF:
                        unmapped.add(top_name)
    assert not unmapped, f"imported but not in sdr_edge.cli.EXTRA_OF: {sorted(unmapped)}"
