"""The wheel claims only the project's names: the apps' folders (server/, client/, export/) are
installed as sdr_edge_server, sdr_edge_client, sdr_edge_export (pyproject's package-dir), so
`pip install sdr-edge` never shadows another project's `server` or `client` module.

The wheel is built from a copy of the working tree with the development venv's setuptools
(no build isolation, so no index is needed), then read as a zip and run from a bare folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLED = {"server": "sdr_edge_server", "client": "sdr_edge_client", "export": "sdr_edge_export"}
PROGRAMS = {"sdr-server": "sdr_edge_server.cli:main", "sdr-client": "sdr_edge_client.cli:main",
            "sdr-export": "sdr_edge_export.cli:main"}


def _source_files() -> dict[str, str]:
    """Every module of the project: wheel path -> repository path."""
    out = {}
    for folder in ("sdr_edge", *INSTALLED):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            installed = INSTALLED.get(folder, folder) + rel[len(folder):]
            out[installed] = rel
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("sdr_edge", *INSTALLED):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check", "--quiet",
                           str(src), "-w", str(base / "dist")],
                          capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (found,) = (base / "dist").glob("sdr_edge-*.whl")
    return found


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _read(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(name).decode()


def test_wheel_has_only_the_projects_top_level_names(wheel):
    names = _names(wheel)
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"sdr_edge", "sdr_edge_server", "sdr_edge_client", "sdr_edge_export",
                    "sdr_edge-0.1.0.dist-info"}, tops
    assert not [n for n in names if n.split("/", 1)[0] in INSTALLED]
    assert sorted(_read(wheel, ".dist-info/top_level.txt").split()) == [
        "sdr_edge", "sdr_edge_client", "sdr_edge_export", "sdr_edge_server"]


def test_every_module_of_the_tree_is_in_the_wheel_under_its_installed_name(wheel):
    """pyproject lists the packages by hand (a renamed folder cannot be found): a new
    sub-package left out of that list fails here."""
    expected = _source_files()
    assert {"sdr_edge_server/cli.py", "sdr_edge_server/registry/app.py",
            "sdr_edge_client/cli.py", "sdr_edge_client/agent.py",
            "sdr_edge_export/cli.py", "sdr_edge/cli.py"} <= set(expected)
    missing = sorted(f"{installed} (from {rel})" for installed, rel in expected.items()
                     if installed not in set(_names(wheel)))
    assert not missing, "modules missing from the wheel:\n" + "\n".join(missing)


def test_entry_points_name_the_installed_modules_and_the_license_is_included(wheel):
    text = _read(wheel, ".dist-info/entry_points.txt")
    scripts = dict(line.split(" = ") for line in
                   text.split("[console_scripts]", 1)[1].strip().splitlines())
    assert scripts == PROGRAMS
    names = set(_names(wheel))
    for target in scripts.values():
        assert target.split(":")[0].replace(".", "/") + ".py" in names
    assert "sdr_edge-0.1.0.dist-info/licenses/LICENSE" in names
    assert _read(wheel, "/licenses/LICENSE") == (REPO / "LICENSE").read_text()
    assert "License-Expression: Apache-2.0" in _read(wheel, ".dist-info/METADATA")


def test_the_unpacked_wheel_runs_its_programs_and_provides_no_generic_name(wheel, tmp_path):
    """From the unpacked wheel alone (python -S: no site-packages, so neither this checkout's
    editable install nor any dependency), each program's --help works: it lists its commands
    without importing them, and `server`/`client`/`export` are not importable."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    bare = tmp_path / "elsewhere"
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), COLUMNS="200")
    for prog, target in PROGRAMS.items():
        module = target.split(":")[0]
        proc = subprocess.run([sys.executable, "-S", "-m", module, "--help"], cwd=bare, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: {prog} ")
        first_command = {"sdr-server": "train", "sdr-client": "signature", "sdr-export": "onnx"}
        assert f"    {first_command[prog]} " in proc.stdout, proc.stdout
    probe = ("import importlib.util as u, sys\n"
             "print([n for n in ('server', 'client', 'export') if u.find_spec(n)])\n"
             "import sdr_edge_server.cli as c\n"
             "print(sorted(c.COMMANDS.values())[0], c.__file__)\n")
    proc = subprocess.run([sys.executable, "-S", "-c", probe], cwd=bare, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found, first = proc.stdout.splitlines()
    assert found == "[]"
    assert first.startswith("sdr_edge_server.") and str(site) in first


def test_the_repository_layout_still_imports_the_apps_by_their_folder_names():
    """From the repository root the apps import under their folder names, and their command
    tables follow that name."""
    probe = ("import server.cli, client.cli, export.cli, server.registry.app\n"
             "print(server.cli.COMMANDS['serve'], client.cli.COMMANDS['agent'], "
             "export.cli.COMMANDS['onnx'])\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["server.serve_cmd", "client.agent_cmd", "export.onnx_cmd"]


def test_the_flower_fab_is_the_library_alone_and_its_components_load_from_it(tmp_path):
    """The FAB a SuperLink ships to the nodes holds pyproject.toml and sdr_edge/ only (no app
    folder), and from the unpacked FAB the ServerApp and ClientApp named in pyproject's
    `[tool.flwr.app.components]` import, from the FAB's own copy of sdr_edge."""
    pytest.importorskip("flwr")
    import io
    import tomllib

    from flwr.cli.build import build_fab_from_disk

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO)))
    tops = {n.split("/", 1)[0] for n in fab.namelist()}
    assert tops == {"pyproject.toml", "sdr_edge", ".info"}, tops
    fab.extractall(tmp_path)
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text(encoding="utf-8"))
    components = config["tool"]["flwr"]["app"]["components"]
    assert set(components) == {"serverapp", "clientapp"}
    probe = ("import importlib, sys\n"
             "for ref in sys.argv[1:]:\n"
             "    module, attr = ref.split(':')\n"
             "    m = importlib.import_module(module)\n"
             "    print(type(getattr(m, attr)).__name__, m.__file__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", probe, components["serverapp"],
                           components["clientapp"]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [kind for kind, _ in lines] == ["ServerApp", "ClientApp"]
    assert all(Path(path).is_relative_to(tmp_path) for _, path in lines), lines
