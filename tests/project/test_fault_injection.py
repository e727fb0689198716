"""Fault injection: no command deletes what it did not write, and one bundle rule on disk.

For every command that writes an --out: a pre-existing foreign folder (photo.jpg, notes.txt)
is refused with one line naming it, exit 2, and every foreign byte is still there; an earlier
output of the same command is replaced atomically and the new artifact verifies. Then the
artifacts a command reads back are corrupted (flipped byte, truncation, empty file, unlisted
file, symlink out of the bundle) and each must be refused with one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sdr_edge.artifacts.bundle import BundleError, load_bundle, verify_bundle, write_bundle
from sdr_edge.artifacts.signing import generate_keypair, load_private_key, load_public_key
from sdr_edge.artifacts.staging import OutputError, check_replaceable_dir, publish_dir
from sdr_edge.artifacts.transfer import (
    TransferError,
    read_folder,
    sign_kit,
    verify_bundle_archive,
    verify_kit_archive,
    write_files_atomically,
)
from sdr_edge.data import InputSpec
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel
from sdr_edge_client.cli import main as client_main
from sdr_edge_export.cli import main as export_main
from sdr_edge_server.cli import main as server_main

SPEC = InputSpec(16, 1, (0.3,), (0.3,), tuple("0123456789"))
FOREIGN = {"photo.jpg": b"\xff\xd8\xff\xe0 a holiday photo", "notes.txt": b"my notes\n"}


def _model(seed: int = 0) -> SubnetModel:
    torch.manual_seed(seed)
    return SubnetModel(Backbone(BackboneConfig.preset("small", in_channels=1)), 10).eval()


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for name, data in FOREIGN.items():
        (path / name).write_bytes(data)
    (path / "album").mkdir()
    (path / "album" / "img.png").write_bytes(b"png")
    return path


def assert_foreign_intact(path: Path) -> None:
    assert sorted(os.listdir(path)) == ["album", "notes.txt", "photo.jpg"]
    for name, data in FOREIGN.items():
        assert (path / name).read_bytes() == data
    assert (path / "album" / "img.png").read_bytes() == b"png"
    # no staging folder left beside it either
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def one_line_naming(err: str, path: Path) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "server.key", tmp_path / "server.pub")
    generate_keypair(tmp_path / "device.key", tmp_path / "device.pub")
    return {"server": load_private_key(tmp_path / "server.key"),
            "server_pub": tmp_path / "server.pub",
            "device": load_private_key(tmp_path / "device.key"),
            "device_pub": tmp_path / "device.pub"}


@pytest.fixture
def bundle(tmp_path, keys):
    return write_bundle(_model(), tmp_path / "parent", (1, 0, 2, 3), SPEC, keys["server"])


# -- the library rule ------------------------------------------------------------------------
def test_writers_refuse_a_foreign_folder_and_keep_every_file(tmp_path, keys, bundle):
    out = foreign_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="is not empty and is not a bundle or kit"):
        write_bundle(_model(), out, (0,), SPEC, keys["server"])
    assert_foreign_intact(out)
    with pytest.raises(OutputError, match=str(out)):
        write_files_atomically(read_folder(bundle), out)
    assert_foreign_intact(out)


def test_a_bundle_with_a_foreign_file_added_is_not_replaced(tmp_path, keys, bundle):
    (bundle / "notes.txt").write_bytes(b"mine")
    with pytest.raises(OutputError, match="not a bundle or kit"):
        write_bundle(_model(1), bundle, (0,), SPEC, keys["server"])
    assert (bundle / "notes.txt").read_bytes() == b"mine"
    (bundle / "notes.txt").unlink()
    verify_bundle(bundle, load_public_key(keys["server_pub"]))  # the old one, untouched


def test_earlier_bundle_and_kit_are_replaced_atomically(tmp_path, keys, bundle):
    pub = load_public_key(keys["server_pub"])
    old_inode = (bundle / "weights.safetensors").stat().st_ino
    new = write_bundle(_model(1), bundle, (3, 3, 3, 3), SPEC, keys["server"])
    assert new == bundle and load_bundle(bundle, pub).route == (3, 3, 3, 3)
    assert (bundle / "weights.safetensors").stat().st_ino != old_inode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".parent.")]
    # an earlier kit folder is replaced by a new kit, and by a bundle
    kit = sign_kit({"kit.json": b'{"a": 1}', "kit.onnx": b"onnx"}, keys["server"])
    out = write_files_atomically(kit, tmp_path / "kit")
    kit2 = sign_kit({"kit.json": b'{"a": 2}', "kit.onnx": b"onnx2"}, keys["server"])
    write_files_atomically(kit2, out)
    assert verify_kit_archive(read_folder(out), pub) and (out / "kit.json").read_bytes() == \
        b'{"a": 2}'
    # an empty folder is fine too
    (tmp_path / "empty").mkdir()
    write_bundle(_model(), tmp_path / "empty", (0,), SPEC, keys["server"])
    verify_bundle(tmp_path / "empty", pub)


def test_a_failed_swap_leaves_the_earlier_output(tmp_path, keys, bundle):
    staging = tmp_path / ".parent.x.staging"
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"new")
    (bundle / "extra").write_bytes(b"appeared while staging")  # folder changed meanwhile
    with pytest.raises(OutputError):
        publish_dir(staging, bundle)
    assert (bundle / "extra").exists() and (bundle / "manifest.json").exists()


def test_symlink_out_and_current_folder_are_refused(tmp_path, keys, bundle, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(bundle)
    with pytest.raises(OutputError, match="symbolic link"):
        write_bundle(_model(), link, (0,), SPEC, keys["server"])
    assert check_replaceable_dir(bundle)  # ours: the names it may replace
    monkeypatch.chdir(foreign_folder(tmp_path / "cwd"))
    rc = client_main(["fetch", "--server", "http://127.0.0.1:9", "--token", "t", "--route",
                      "0-0-0-0", "--pubkey", str(keys["server_pub"]), "--out", "."])
    assert rc == 2


# -- each command against a foreign --out and an earlier output ------------------------------
def test_fetch_and_fetch_kit_refuse_a_foreign_out_before_any_download(tmp_path, keys, capsys):
    out = foreign_folder(tmp_path / "photos")
    base = ["fetch", "--server", "http://127.0.0.1:9", "--token", "t",
            "--pubkey", str(keys["server_pub"]), "--out", str(out)]
    for what in (["--route", "0-1-2-3"], ["--kit"]):
        assert client_main([*base, *what]) == 2
        line = one_line_naming(capsys.readouterr().err, out)
        assert "refusing to replace it" in line and "cannot reach" not in line
        assert_foreign_intact(out)


def test_fetch_dot_names_the_folder(tmp_path, keys, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = client_main(["fetch", "--server", "http://127.0.0.1:9", "--token", "t", "--route",
                      "0-0-0-0", "--pubkey", str(keys["server_pub"]), "--out", "."])
    assert rc == 2
    err = capsys.readouterr().err
    line = one_line_naming(err, tmp_path)
    assert "is the current folder" in line and "empty name" not in err


def test_prune_foreign_out_refused_and_earlier_output_replaced(tmp_path, keys, bundle, capsys):
    args = ["prune", "--bundle", str(bundle), "--pubkey", str(keys["server_pub"]),
            "--key", str(tmp_path / "device.key"), "--max-steps", "6"]
    out = foreign_folder(tmp_path / "photos")
    assert client_main([*args, "--out", str(out)]) == 2
    one_line_naming(capsys.readouterr().err, out)
    assert_foreign_intact(out)

    pruned = tmp_path / "pruned"
    assert client_main([*args, "--out", str(pruned), "--macs-ratio", "0.7"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert client_main([*args, "--out", str(pruned), "--macs-ratio", "0.4"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["macs_after"] < first["macs_after"]
    loaded = load_bundle(pruned, load_public_key(keys["device_pub"]))
    assert loaded.manifest["provenance"]["pruned"]["macs_after"] == second["macs_after"]


def test_export_onnx_refuses_foreign_files_and_replaces_its_own(tmp_path, keys, bundle, capsys):
    base = ["onnx", "--bundle", str(bundle), "--pubkey", str(keys["server_pub"]),
            "--eval-source", "builtin:digits", "--eval-limit", "32", "--no-progress"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.onnx").write_bytes(b"my own model")
    assert export_main([*base, "--out", str(mine / "model.onnx")]) == 2
    one_line_naming(capsys.readouterr().err, mine / "model.onnx")
    assert (mine / "model.onnx").read_bytes() == b"my own model"
    (mine / "other.json").write_text("my notes")  # a sidecar name that is not ours
    assert export_main([*base, "--out", str(mine / "other.onnx")]) == 2
    one_line_naming(capsys.readouterr().err, mine / "other.json")
    assert (mine / "other.json").read_text() == "my notes" and not (mine / "other.onnx").exists()
    (mine / "dir.onnx").mkdir()
    assert export_main([*base, "--out", str(mine / "dir.onnx")]) == 2
    one_line_naming(capsys.readouterr().err, mine / "dir.onnx")

    out = tmp_path / "models" / "model.onnx"
    assert export_main([*base, "--out", str(out)]) == 0
    first = json.loads(out.with_suffix(".json").read_text())["model_sha256"]
    assert export_main([*base, "--out", str(out), "--batch", "4"]) == 0  # replaces its own
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["batch"] == 4 and doc["model_sha256"] != first
    from sdr_edge.artifacts.atomic import sha256_file

    assert sha256_file(out) == doc["model_sha256"]


def test_trt_engine_out_rule(tmp_path):
    from sdr_edge.artifacts.atomic import sha256_file
    from sdr_edge.export.tensorrt_build import check_engine_output

    out = tmp_path / "model.engine"
    check_engine_output(out)  # absent: fine
    out.write_bytes(b"someone's engine")
    with pytest.raises(OutputError, match="model.engine exists and was not written"):
        check_engine_output(out)
    (tmp_path / "model.engine.json").write_text(json.dumps(
        {"format": "sdr-edge-engine", "engine_sha256": sha256_file(out)}))
    check_engine_output(out)  # an earlier engine of ours, its sha256 recorded


def _agent_config(tmp_path: Path, state_dir: Path, pub: Path):
    from sdr_edge_client.agent import AgentConfig

    text = (f'[agent]\ndata = "builtin:digits"\nstate_dir = "{state_dir}"\n'
            f'[registry]\nurl = "http://127.0.0.1:9"\npubkey = "{pub}"\ntoken = "t"\n')
    (tmp_path / "agent.toml").write_text(text)
    return AgentConfig.load(tmp_path / "agent.toml")


def test_agent_state_dir_foreign_refused_restart_keeps_the_marker(tmp_path, keys, capsys):
    from sdr_edge_client.agent import STATE_FILE, Agent, AgentError

    state = foreign_folder(tmp_path / "photos")
    _agent_config(tmp_path, state, keys["server_pub"])
    assert client_main(["agent", "--config", str(tmp_path / "agent.toml")]) == 2
    one_line_naming(capsys.readouterr().err, state)
    assert_foreign_intact(state)
    (state / STATE_FILE).write_text('{"format": "someone-else"}')
    assert client_main(["agent", "--config", str(tmp_path / "agent.toml"), "--restart"]) == 2
    assert "not an agent state file" in capsys.readouterr().err
    assert (state / STATE_FILE).read_text() == '{"format": "someone-else"}'  # not unlinked

    fresh = tmp_path / "fresh"
    cfg = _agent_config(tmp_path, fresh, keys["server_pub"])
    Agent(cfg)  # marks the folder as the agent's at once
    assert json.loads((fresh / STATE_FILE).read_text())["format"] == "sdr-agent-state"
    (fresh / ".kit.abc.staging").mkdir()  # a crash's leftovers do not lock the agent out
    Agent(cfg, restart=True)
    other = foreign_folder(tmp_path / "photos2")
    with pytest.raises(AgentError, match="not empty and holds no"):
        Agent(_agent_config(tmp_path, other, keys["server_pub"]))
    assert_foreign_intact(other)


def test_keygen_never_replaces_a_foreign_key_file(tmp_path, capsys):
    out = tmp_path / "keys"
    out.mkdir()
    (out / "server.pub").write_bytes(b"the public key of another server")
    assert server_main(["keygen", "--out", str(out)]) == 2
    one_line_naming(capsys.readouterr().err, out / "server.pub")
    assert server_main(["keygen", "--out", str(out), "--force"]) == 2
    assert "even with --force" in capsys.readouterr().err
    assert (out / "server.pub").read_bytes() == b"the public key of another server"
    assert not (out / "server.key").exists()
    # its own earlier pair is replaced with --force
    assert server_main(["keygen", "--out", str(tmp_path / "k")]) == 0
    old = (tmp_path / "k" / "server.pub").read_bytes()
    assert server_main(["keygen", "--out", str(tmp_path / "k"), "--force"]) == 0
    assert (tmp_path / "k" / "server.pub").read_bytes() != old
    load_private_key(tmp_path / "k" / "server.key")
    (tmp_path / "afile").write_text("x")
    assert server_main(["keygen", "--out", str(tmp_path / "afile")]) == 2
    one_line_naming(capsys.readouterr().err, tmp_path / "afile")


def test_fleet_keys_never_replace_the_bundle_signing_key(tmp_path, capsys):
    out = tmp_path / "keys"
    assert server_main(["keygen", "--out", str(out)]) == 0  # Ed25519 server.key
    signing_key = (out / "server.key").read_bytes()
    capsys.readouterr()
    assert server_main(["fleet-keys", "--out", str(out), "--supernodes", "1"]) == 2
    assert "server.key" in one_line_naming(capsys.readouterr().err, out)
    assert server_main(["fleet-keys", "--out", str(out), "--supernodes", "1", "--force"]) == 2
    line = one_line_naming(capsys.readouterr().err, out / "server.key")
    assert "even with --force" in line
    assert (out / "server.key").read_bytes() == signing_key
    assert not (out / "ca.crt").exists()
    # its own earlier output is replaced with --force
    fleet = tmp_path / "fleet"
    assert server_main(["fleet-keys", "--out", str(fleet), "--supernodes", "1"]) == 0
    old = (fleet / "ca.crt").read_bytes()
    assert server_main(["fleet-keys", "--out", str(fleet), "--supernodes", "1", "--force"]) == 0
    assert (fleet / "ca.crt").read_bytes() != old


def test_token_file_that_is_not_ours_or_a_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert server_main(["token", "--tokens", str(notes), "--name", "a"]) == 2
    one_line_naming(capsys.readouterr().err, notes)
    assert notes.read_text() == "my notes\n"
    folder = foreign_folder(tmp_path / "photos")
    assert server_main(["token", "--tokens", str(folder), "--name", "a"]) == 2
    one_line_naming(capsys.readouterr().err, folder)
    assert_foreign_intact(folder)


# -- corrupted artifacts that a command reads back --------------------------------------------
def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _outside_symlink(bundle: Path) -> None:
    weights = bundle / "weights.safetensors"
    outside = bundle.parent / "outside.safetensors"
    outside.write_bytes(weights.read_bytes())  # same bytes: the hash would match
    weights.unlink()
    weights.symlink_to(outside)


CORRUPTIONS = {
    "flip": (lambda b: _flip(b / "weights.safetensors"), "weights.safetensors",
             "checksum mismatch"),
    "truncate": (lambda b: (b / "weights.safetensors").write_bytes(
        (b / "weights.safetensors").read_bytes()[:100]), "weights.safetensors", "checksum"),
    "empty": (lambda b: (b / "weights.safetensors").write_bytes(b""), "weights.safetensors",
              "checksum"),
    "empty-manifest": (lambda b: (b / "manifest.json").write_bytes(b""), "manifest.sig",
                       "does not verify"),
    "unlisted": (lambda b: (b / "notes.txt").write_bytes(b"x"), "notes.txt", "not listed"),
    "symlink-out": (_outside_symlink, "weights.safetensors", "symbolic link"),
    "subfolder": (lambda b: (b / "sub").mkdir(), "sub", "not a regular file"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_bundle_is_refused_by_every_reader(kind, tmp_path, keys, bundle, capsys):
    corrupt, name, reason = CORRUPTIONS[kind]
    corrupt(bundle)
    with pytest.raises(BundleError, match=reason) as info:
        load_bundle(bundle, load_public_key(keys["server_pub"]))
    assert str(bundle) in str(info.value) and name in str(info.value)
    prune = ["prune", "--bundle", str(bundle), "--pubkey", str(keys["server_pub"]),
             "--key", str(tmp_path / "device.key"), "--out", str(tmp_path / "pruned")]
    assert client_main(prune) == 2
    line = one_line_naming(capsys.readouterr().err, bundle)
    assert name in line and reason in line
    assert not (tmp_path / "pruned").exists()
    onnx = ["onnx", "--bundle", str(bundle), "--pubkey", str(keys["server_pub"]), "--out",
            str(tmp_path / "m.onnx"), "--eval-source", "builtin:digits", "--no-progress"]
    assert export_main(onnx) == 2
    line = one_line_naming(capsys.readouterr().err, bundle)
    assert name in line and reason in line
    assert not (tmp_path / "m.onnx").exists()


def test_in_memory_and_on_disk_rules_agree(tmp_path, keys, bundle):
    pub = load_public_key(keys["server_pub"])
    files = read_folder(bundle)
    verify_bundle_archive(files, pub)
    with pytest.raises(TransferError, match="not listed in the signed manifest: notes.txt"):
        verify_bundle_archive({**files, "notes.txt": b"x"}, pub)
    (bundle / "notes.txt").write_bytes(b"x")
    with pytest.raises(BundleError, match="not listed in the signed manifest: notes.txt"):
        verify_bundle(bundle, pub)
