"""Checkpoint integrity and run-dir hygiene: a corrupt or truncated checkpoint falls back to the
previous one or is refused in one line; a killed run's staging leftovers are cleaned and never
listed in manifest.json; --out that is a file or someone else's folder is refused untouched."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.artifacts.weights import load_tensors
from sdr_edge.training import load_config, train
from sdr_edge.training.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    previous_path,
    read_checkpoint,
    save_checkpoint,
)
from sdr_edge.training.metrics import read_metrics
from sdr_edge.training.pipeline import Trainer

ROOT = Path(__file__).resolve().parents[3]

CONFIG = """
[data]
source = "builtin:digits"
image_size = 8
limit = 200
val_fraction = 0.1
[model]
widths = [8, 8, 8, 8]
blocks = [1, 1, 1, 1]
stem_width = 8
[routing]
branching = [2, 2]
[ssl]
proj_dim = 16
pred_hidden = 8
batch_size = 64
[schedule]
phase0_epochs = 2
level_epochs = [1, 1]
[kit]
epochs = 0
[train]
seed = 1
threads = 1
knn_every = 0
"""


class Stop(Exception):
    """Stands in for a kill right after phase 0's last checkpoint."""


def flip_data_byte(path: Path) -> None:
    """Flip one byte in the middle of the tensor data (the way a conv weight became 1.4e37)."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    body = len(data) - 8 - header
    assert body > 0, "this checkpoint holds no tensors"
    data[8 + header + body // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, config) -> Path:
    """A run stopped after phase 0: last = phase0 epoch 2, prev = phase0 epoch 1."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    mp = pytest.MonkeyPatch()

    def stop(self, teacher):
        raise Stop

    mp.setattr(Trainer, "_cluster", stop)
    try:
        with pytest.raises(Stop):
            train(load_config(config), out)
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, config) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(config), out)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdr_edge_server.cli", "train", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


# ----- the checkpoint file itself --------------------------------------------------------

def _save(run_dir: Path, epoch: int) -> None:
    model = torch.nn.Linear(64, 8)
    save_checkpoint(run_dir, {"phase": "phase0", "epoch": epoch}, {"model": model})


def test_checkpoint_keeps_prev_and_detects_flip_and_truncation(tmp_path):
    _save(tmp_path, 1)
    assert not previous_path(tmp_path).exists()
    _save(tmp_path, 2)
    last, prev = checkpoint_path(tmp_path), previous_path(tmp_path)
    assert read_checkpoint(last).meta["epoch"] == 2 and read_checkpoint(prev).meta["epoch"] == 1

    flip_data_byte(last)
    with pytest.raises(CheckpointError, match=r"last\.safetensors is corrupt"):
        read_checkpoint(last)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.meta["epoch"] == 1 and ckpt.path == prev
    assert "last.safetensors is corrupt" in ckpt.fallback

    truncate(prev)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "last.safetensors is corrupt" in message
    assert "prev.safetensors is truncated or unreadable" in message and "--restart" in message


def test_checkpoint_without_digest_is_not_trusted(tmp_path):
    from safetensors.torch import save_file

    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file({"module.model.w": torch.ones(3)}, str(path),
              metadata={"json": json.dumps({"format": "sdr-edge-checkpoint"})})
    with pytest.raises(CheckpointError, match="has no sha256"):
        read_checkpoint(path)


# ----- a real run ------------------------------------------------------------------------

def test_flipped_byte_in_last_falls_back_to_prev_and_matches_uninterrupted(
        stopped_run, finished_run, config, tmp_path, caplog):
    out = copy_run(stopped_run, tmp_path / "run")
    flip_data_byte(checkpoint_path(out))
    with caplog.at_level("WARNING"):
        result = train(load_config(config), out)
    assert result.resumed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("last.safetensors is corrupt" in w and "resuming from" in w
               and "prev.safetensors" in w for w in warnings), warnings
    assert (out / rd.CHECKPOINT_DIR / "last.safetensors.corrupt").is_file()
    events = [m for m in read_metrics(out) if m.get("event") == "checkpoint_fallback"]
    assert len(events) == 1 and events[0]["used"].endswith("prev.safetensors")
    rd.verify_run_manifest(out)
    # resumed from epoch 1 of phase 0: the very same weights as a run never interrupted
    for name in (rd.TEACHER, rd.SDRNET):
        a, _ = load_tensors(finished_run / name)
        b, _ = load_tensors(out / name)
        for key in a:
            assert torch.isfinite(b[key].float()).all(), f"{name}: {key} not finite"
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


def test_truncated_last_without_prev_is_refused_in_one_line_then_restart(
        stopped_run, config, tmp_path):
    out = copy_run(stopped_run, tmp_path / "run")
    truncate(checkpoint_path(out))
    previous_path(out).unlink()
    proc = cli("--config", config, "--out", out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(checkpoint_path(out)) in lines[0] and "truncated" in lines[0]
    assert "--restart" in lines[0]
    assert checkpoint_path(out).is_file(), "a refused checkpoint must not be deleted"

    result = train(load_config(config), out, restart=True)
    assert not result.resumed
    rd.verify_run_manifest(out)
    assert read_checkpoint(checkpoint_path(out)).meta["phase"] == "done"


def test_resume_refuses_a_phase_artifact_changed_since_the_checkpoint(
        finished_run, config, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / rd.MANIFEST).unlink()  # not finished any more: a rerun resumes and reloads the teacher
    flip_data_byte(out / rd.TEACHER)
    code, err = _main(capsys, "--config", config, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out / rd.TEACHER} is corrupt" in err and "--restart" in err


def test_staging_leftovers_are_cleaned_and_never_in_the_manifest(finished_run, config, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    (out / ".kit.abcd").mkdir()
    (out / ".kit.abcd" / "kit.safetensors").write_bytes(b"half a kit")
    (out / rd.REPORT_DIR / "x.tmp").write_text("half a plot")
    (out / ".manifest.json.k2j3.tmp").write_text("{")
    (out / rd.CHECKPOINT_DIR / ".last.safetensors.q1.tmp").write_bytes(b"\0")
    (out / rd.MANIFEST).unlink()  # so the rerun writes the manifest again
    train(load_config(config), out)
    assert not (out / ".kit.abcd").exists()
    assert not (out / rd.REPORT_DIR / "x.tmp").exists()
    assert not (out / ".manifest.json.k2j3.tmp").exists()
    assert not (out / rd.CHECKPOINT_DIR / ".last.safetensors.q1.tmp").exists()
    files = rd.verify_run_manifest(out)["files"]
    assert not [f for f in files if f.startswith(".") or "/." in f or f.endswith(".tmp")], files
    assert rd.SDRNET in files


def test_manifest_skips_hidden_and_tmp_entries(tmp_path):
    (tmp_path / ".kit.abcd").mkdir()
    (tmp_path / ".kit.abcd" / "kit.safetensors").write_bytes(b"x")
    (tmp_path / rd.REPORT_DIR).mkdir()
    (tmp_path / rd.REPORT_DIR / "x.tmp").write_bytes(b"x")
    (tmp_path / rd.REPORT_DIR / "loss.png").write_bytes(b"png")  # a view, redrawn later
    (tmp_path / rd.TENSORBOARD_DIR).mkdir()
    (tmp_path / rd.TENSORBOARD_DIR / "events.out.tfevents.1.host").write_bytes(b"ev")
    (tmp_path / rd.CONFIG).write_text("[data]\n")
    rd.write_run_manifest(tmp_path)
    files = json.loads((tmp_path / rd.MANIFEST).read_text())["files"]
    assert list(files) == [rd.CONFIG]


# ----- --out and --config that must be refused -------------------------------------------

def _main(capsys, *args: str | Path) -> tuple[int, str]:
    from sdr_edge_server.cli import main

    code = main(["train", *map(str, args)])
    return code, capsys.readouterr().err


def test_out_is_a_file_is_refused(config, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = _main(capsys, "--config", config, "--out", target)
    assert code == 2 and err.count("\n") == 1
    assert "is a file, not a folder" in err and str(target) in err
    assert target.read_text() == "mine"


@pytest.mark.parametrize("files", [
    {"config.toml": "[tool.poetry]\nname = 'x'\n"},              # someone else's config.toml
    {"config.toml": CONFIG, "holiday.jpg": "jpeg"},               # our config among their files
    {"checkpoints/notes.txt": "mine", "teacher.safetensors": "x"},  # our names, no config
])
def test_foreign_folder_is_refused_untouched(config, tmp_path, capsys, files):
    out = tmp_path / "theirs"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / ".draft.tmp").write_text("also mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = _main(capsys, "--config", config, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert str(out) in err and "pass another --out" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    for name, text in files.items():
        assert (out / name).read_text() == text
    assert (out / ".draft.tmp").read_text() == "also mine"


def test_config_changed_before_first_checkpoint_is_a_different_run(config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / rd.CONFIG).write_text(CONFIG.replace("seed = 1", "seed = 2"))
    code, err = _main(capsys, "--config", config, "--out", out)
    assert code == 2 and "holds a different run (train.seed: 2 in config.toml, 1 now)" in err


def test_binary_config_is_refused_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "garbage.toml"
    bad.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8)))
    code, err = _main(capsys, "--config", bad, "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1
    assert str(bad) in err and "not a TOML text file" in err
    assert not (tmp_path / "o").exists()


def test_opencv_does_not_print_for_truncated_images(tmp_path, capfd):
    import cv2

    from sdr_edge.data.folder import scan_folder

    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for ext in (".png", ".jpg"):
        ok, data = cv2.imencode(ext, image)
        assert ok
        (tmp_path / f"good{ext}").write_bytes(data.tobytes())
        (tmp_path / f"cut{ext}").write_bytes(data.tobytes()[: len(data) // 2])
    capfd.readouterr()
    scan = scan_folder(tmp_path, 16, 1)
    captured = capfd.readouterr()
    assert sorted(p.name for p in scan.skipped) == ["cut.jpg", "cut.png"]
    assert len(scan.paths) == 2
    assert "WARN:" not in captured.err and "ERROR:" not in captured.err, captured.err
