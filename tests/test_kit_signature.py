"""The signature kit: training, ONNX parity, the torch-free client path, folders and DP output."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_run import make_tiny_run

from sdr_edge.artifacts.weights import load_tensors
from sdr_edge.data import load_source
from sdr_edge.routing.kit import SignatureKitNet
from sdr_edge.routing.kit_runtime import KitError, KitRunner, compute_signature
from sdr_edge.routing.signature import route_signature, validate_signature

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir, codes = make_tiny_run(tmp_path_factory.mktemp("run") / "run")
    return run_dir, codes


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """40 digit PNGs at another size (the client resizes) plus one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    src = load_source("builtin:digits", 16, limit=40, seed=3)
    for i, im in enumerate(src.images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.resize(im, (24, 24)))
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_kit_files_and_metrics(tiny_run):
    run_dir, codes = tiny_run
    info = json.loads((run_dir / "kit" / "kit.json").read_text())
    assert info["branching"] == [2, 2]
    assert info["output"]["level_offsets"] == [0, 2]
    assert set(info["files"]) == {"kit.safetensors", "kit.onnx"}
    m = info["metrics"]
    majority = max(np.bincount(codes[:, 0])) / len(codes)
    # distilled from the codes: the held-out level-1 agreement beats the majority class
    assert m["agreement_level1"] > max(0.75, majority)
    assert 0.0 <= m["agreement_all_levels"] <= m["agreement_level1"]


def test_onnx_matches_torch_and_batch_is_dynamic(tiny_run):
    run_dir, _ = tiny_run
    state, meta = load_tensors(run_dir / "kit" / "kit.safetensors")
    arch = meta["architecture"]
    net = SignatureKitNet(arch["in_channels"], arch["branching"], arch["widths"])
    net.load_state_dict(state)
    net.eval()
    runner = KitRunner(run_dir / "kit")
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 1, 16, 16)).astype(np.float32)
        levels = runner.probabilities(x)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.concatenate(levels, axis=1), ref, atol=1e-5)
        for p in levels:
            np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="kit input"):
        runner.probabilities(np.zeros((2, 3, 16, 16), np.float32))


def test_signature_is_the_mean_of_kit_probabilities(tiny_run):
    run_dir, _ = tiny_run
    src = load_source("builtin:digits", 16, limit=100)
    runner = KitRunner(run_dir / "kit")
    sig = compute_signature(runner, src.images, batch_size=32)
    from sdr_edge.data.preprocess import normalize_batch

    levels = runner.probabilities(normalize_batch(src.images, runner.spec))
    assert sig.count == 100
    for r, p in enumerate(levels):
        np.testing.assert_allclose(sig.levels[r], p.mean(axis=0), atol=1e-6)
    assert route_signature(sig) == tuple(int(np.argmax(p.mean(axis=0))) for p in levels)


def test_folder_skips_corrupt_files_and_empty_folders_fail(tiny_run, image_folder, tmp_path):
    run_dir, _ = tiny_run
    skipped: list[Path] = []
    sig = compute_signature(run_dir / "kit", image_folder, skipped=skipped)
    assert sig.count == 40
    assert [p.name for p in skipped] == ["broken.png"]
    with pytest.raises(ValueError, match="no image files"):
        compute_signature(run_dir / "kit", tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="no readable image"):
        compute_signature(run_dir / "kit", tmp_path)
    with pytest.raises(FileNotFoundError):
        compute_signature(run_dir / "kit", tmp_path / "missing")


def test_tampered_kit_is_refused(tiny_run, tmp_path):
    import shutil

    kit = tmp_path / "kit"
    shutil.copytree(tiny_run[0] / "kit", kit)
    data = bytearray((kit / "kit.onnx").read_bytes())
    data[-3] ^= 0xFF
    (kit / "kit.onnx").write_bytes(bytes(data))
    with pytest.raises(KitError, match="sha256"):
        KitRunner(kit)
    with pytest.raises(KitError, match="not a signature kit"):
        KitRunner(tmp_path)


def test_cli_signature_does_not_import_torch(tiny_run, image_folder, tmp_path):
    """`sdr-client signature` in a fresh interpreter: writes a valid signature, torch never loads."""
    run_dir, _ = tiny_run
    out, out_dp = tmp_path / "sig.json", tmp_path / "sig_dp.json"
    script = textwrap.dedent(f"""
        import sys
        from client.cli import main
        rc = main(["signature", "--kit", {str(run_dir / 'kit')!r}, "--images",
                   {str(image_folder)!r}, "--out", {str(out)!r}])
        rc2 = main(["signature", "--kit", {str(run_dir / 'kit')!r}, "--images",
                    {str(image_folder)!r}, "--out", {str(out_dp)!r}, "--dp-epsilon", "2"])
        assert rc == 0 and rc2 == 0, (rc, rc2)
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert not bad, bad[:5]
        print("NO_TORCH")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "NO_TORCH" in proc.stdout
    assert '"skipped": 1' in proc.stdout
    sig = validate_signature(json.loads(out.read_text()), (2, 2))
    assert sig.count == 40 and sig.dp_epsilon is None
    dp = validate_signature(json.loads(out_dp.read_text()), (2, 2))
    assert dp.dp_epsilon == 2.0
    assert len(out.read_bytes()) < 400


def test_cli_signature_errors_are_one_line(tiny_run, tmp_path):
    from client.cli import main

    run_dir, _ = tiny_run
    assert main(["signature", "--kit", str(run_dir / "kit"), "--images", str(tmp_path / "no"),
                 "--out", str(tmp_path / "s.json")]) == 2
    assert main(["signature", "--kit", str(run_dir / "kit"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "s.json"), "--dp-epsilon", "-1"]) == 2
    assert main(["signature", "--kit", str(tmp_path), "--images", str(tmp_path),
                 "--out", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()
