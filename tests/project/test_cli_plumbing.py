"""The shared library plumbing of the three programs: `--help` lists every sub-command, one
error rule (SdrEdgeError -> one line, exit 2; anything else keeps its traceback), one token
lookup, one route-id parser, one exception base."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdr_edge.cli import CommandError, command_summary, run_cli
from sdr_edge.errors import SdrEdgeError
from sdr_edge.registry_client import TOKEN_ENV, RegistryError, TokenError, resolve_token
from sdr_edge.routing.route_ids import RouteIdError, format_route_id, parse_route_id

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = {"sdr-server": "sdr_edge_server.cli", "sdr-client": "sdr_edge_client.cli",
            "sdr-export": "sdr_edge_export.cli"}


# -- --help -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("prog", "cli_module"), sorted(PROGRAMS.items()))
def test_help_lists_every_command_with_its_summary_without_importing_them(prog, cli_module):
    """In a fresh interpreter: every command has its docstring's first line in --help, and
    neither a command module nor torch was imported to produce it."""
    commands = importlib.import_module(cli_module).COMMANDS
    package = cli_module.rpartition(".")[0]  # the installed name: the table follows it
    assert all(m.startswith(f"{package}.") for m in commands.values()), commands
    script = textwrap.dedent(f"""
        import sys
        from {cli_module} import main
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        loaded = sorted(m for m in {sorted(commands.values())!r} if m in sys.modules)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "httpx", "onnx"))
        print("LOADED", loaded, heavy[:3])
    """)
    env = {**os.environ, "COLUMNS": "400"}  # argparse would wrap long summaries
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED [] []" in proc.stdout
    lines = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    for name, module_name in commands.items():
        summary = command_summary(module_name)
        assert summary, f"{module_name} has no docstring summary"
        assert f"{name} {' '.join(summary.split())}" in lines, (name, proc.stdout)


def test_summary_is_the_imported_docstrings_first_line():
    import sdr_edge_client.signature_cmd as light

    assert command_summary("sdr_edge_client.signature_cmd") == light.__doc__.strip().splitlines()[0]
    assert command_summary("no_such_module_xyz") == ""


def test_chosen_command_still_gets_its_full_help(capsys):
    from sdr_edge_client.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fetch", "--help"])
    assert exc.value.code == 0
    assert "--token-file" in capsys.readouterr().out


# -- the error rule -----------------------------------------------------------------------------
COMMAND_MODULE = '''"""A throwaway command whose run raises what --raise names."""
from sdr_edge.cli import CommandError
from sdr_edge.artifacts.transfer import TransferError


def add_arguments(parser):
    parser.add_argument("--raise", dest="what", required=True)


def run(args):
    if args.what == "command":
        raise CommandError("bad flag --x")
    if args.what == "library":
        raise TransferError("bundle refused: manifest.json missing")
    if args.what == "missing":
        raise FileNotFoundError("no such file: data.bin")
    if args.what == "value":
        raise ValueError("a bug, not a user error")
    return 0
'''


@pytest.fixture()
def throwaway_command(tmp_path, monkeypatch):
    (tmp_path / "sdr_throwaway_cmd.py").write_text(COMMAND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {"go": "sdr_throwaway_cmd"}
    sys.modules.pop("sdr_throwaway_cmd", None)


@pytest.mark.parametrize(("what", "message"), [
    ("command", "bad flag --x"),
    ("library", "bundle refused: manifest.json missing"),
    ("missing", "no such file: data.bin"),
])
def test_user_errors_are_one_line_with_exit_2(throwaway_command, capsys, what, message):
    assert run_cli("prog", "test", throwaway_command, ["go", "--raise", what]) == 2
    err = capsys.readouterr().err
    assert err == f"prog go: error: {message}\n"


def test_a_plain_value_error_keeps_its_traceback(throwaway_command):
    with pytest.raises(ValueError, match="a bug, not a user error"):
        run_cli("prog", "test", throwaway_command, ["go", "--raise", "value"])


def test_success_returns_0(throwaway_command):
    assert run_cli("prog", "test", throwaway_command, ["go", "--raise", "nothing"]) == 0


# -- one token lookup ---------------------------------------------------------------------------
def test_token_precedence_explicit_then_file_then_env(tmp_path):
    f = tmp_path / "token"
    f.write_text("  from-file\n")
    env = {TOKEN_ENV: "from-env"}
    assert resolve_token("explicit", f, env) == "explicit"
    assert resolve_token(None, f, env) == "from-file"
    assert resolve_token("", f, env) == "from-file"  # an empty flag counts as not given
    assert resolve_token(None, None, env) == "from-env"
    assert resolve_token(None, "", env) == "from-env"  # an empty config value: not given


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"), ("\n  \n", "is empty"), ("abc\ndef\n", "single-line"),
    ("t\u00f6ken", "single-line ASCII"),
])
def test_token_file_errors_name_the_file_and_never_fall_back(tmp_path, content, message):
    f = tmp_path / "client.token"
    if content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(TokenError, match=message) as exc:
        resolve_token(None, f, {TOKEN_ENV: "from-env"}, file_label="--token-file")
    text = str(exc.value)
    assert "\n" not in text and f"--token-file {f}" in text


def test_token_file_that_is_a_folder(tmp_path):
    with pytest.raises(TokenError, match="is not a file"):
        resolve_token(None, tmp_path, {})


def test_no_token_anywhere_says_how_to_give_one():
    with pytest.raises(TokenError, match=r"no registry token: pass --token"):
        resolve_token(None, None, {TOKEN_ENV: "  "}, hint="pass --token")


def test_agent_uses_the_same_lookup(tmp_path, monkeypatch):
    from sdr_edge_client.agent import AgentConfig

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    (tmp_path / "tok").write_text("from-file\n")
    cfg = AgentConfig(data="builtin:digits", state_dir=tmp_path / "s", registry_url="http://x",
                      pubkey=tmp_path / "p", token_file=tmp_path / "tok")
    assert cfg.registry_token() == "from-file"
    cfg.token_file = tmp_path / "missing"
    with pytest.raises(TokenError, match="registry.token_file .*missing does not exist"):
        cfg.registry_token()
    cfg.token_file = None
    assert cfg.registry_token() == "from-env"


def test_fetch_without_a_token_is_one_line(tmp_path, monkeypatch, capsys):
    from sdr_edge_client.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    rc = main(["fetch", "--server", "http://127.0.0.1:9", "--route", "1-0", "--pubkey",
               str(tmp_path / "server.pub"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("sdr-client fetch: error: no registry token: "
                                               "pass --token or --token-file, or set "
                                               f"${TOKEN_ENV}")


# -- one route-id parser ------------------------------------------------------------------------
def test_route_ids_parse_and_format():
    assert parse_route_id("1-0-2-3") == (1, 0, 2, 3)
    assert parse_route_id("1,0,2,3", separators="-,") == (1, 0, 2, 3)
    assert parse_route_id("1-0-2-3", (2, 2, 4, 4)) == (1, 0, 2, 3)
    assert format_route_id(parse_route_id("12-0-9999")) == "12-0-9999"


@pytest.mark.parametrize(("text", "kwargs", "message"), [
    ("1,0,2,3", {}, "malformed"),  # a comma only where the caller allows it
    ("01-0", {}, "malformed"),  # no leading zeros: one spelling per route
    ("10000-0", {}, "malformed"),
    ("1-0-", {}, "malformed"),
    ("1-0\n", {}, "malformed"),
    ("-".join(["1"] * 65), {}, "malformed"),
    ("1-0-2", {"branching": (4, 4)}, "has 3 levels"),
    ("1-4", {"branching": (4, 4)}, "digit 4 at level 1 is out of range"),
])
def test_route_ids_refused(text, kwargs, message):
    with pytest.raises(RouteIdError, match=message):
        parse_route_id(text, **kwargs)


def test_route_ids_of_server_client_and_config_are_the_same_parser():
    from sdr_edge.federated.config import FederationConfig, FederationConfigError
    from sdr_edge_server.registry import route_ids as server_ids

    assert server_ids.parse_route_id is parse_route_id
    cfg = FederationConfig.fixed_route
    from types import SimpleNamespace

    assert cfg(SimpleNamespace(route="1,0-2,3")) == (1, 0, 2, 3)
    with pytest.raises(FederationConfigError, match="is not digits like 1,0,2,3"):
        cfg(SimpleNamespace(route="01,0,2,3"))


# -- one exception base -------------------------------------------------------------------------
def test_error_classes_are_sdr_edge_errors_and_keep_their_bases():
    from sdr_edge.artifacts.transfer import TransferError
    from sdr_edge.routing.kit_runtime import KitError

    for cls, old_base in [(CommandError, Exception), (RegistryError, RuntimeError),
                          (TokenError, ValueError), (RouteIdError, ValueError),
                          (TransferError, ValueError), (KitError, ValueError)]:
        assert issubclass(cls, SdrEdgeError) and issubclass(cls, old_base), cls


BUILTIN_BASES = {"Exception", "ValueError", "RuntimeError", "OSError", "TypeError", "KeyError"}


def test_every_project_exception_class_derives_from_sdr_edge_error():
    """Classes deriving directly from a builtin exception must list SdrEdgeError too (private
    control-flow exceptions, `_Name`, excepted)."""
    missing = []
    for top in ("sdr_edge", "server", "client", "export"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (not isinstance(node, ast.ClassDef) or node.name.startswith("_")
                        or node.name == "SdrEdgeError"):
                    continue
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & BUILTIN_BASES and "SdrEdgeError" not in bases:
                    missing.append(f"{rel}:{node.lineno}: {node.name}")
    assert not missing, "not SdrEdgeError subclasses:\n" + "\n".join(missing)
