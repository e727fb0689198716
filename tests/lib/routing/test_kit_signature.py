"""The signature kit: training, ONNX parity, the torch-free client path, folders and DP output,
and trust: a device verifies the kit's signed manifest, and signatures name the kit's run."""

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
from helpers_rundir import shared_tiny_run

from sdr_edge.artifacts.run_dir import load_codes
from sdr_edge.artifacts.signing import generate_keypair, load_private_key, load_public_key
from sdr_edge.artifacts.transfer import read_folder, sign_kit, write_files_atomically
from sdr_edge.artifacts.weights import load_tensors
from sdr_edge.data import load_source
from sdr_edge.routing.kit import SignatureKitNet
from sdr_edge.routing.kit_runtime import KitError, KitRunner, compute_signature
from sdr_edge.routing.signature import route_signature, run_id_of, validate_signature

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The registry's key pair and a stranger's (server.key/.pub, other.key/.pub)."""
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "server.key", folder / "server.pub")
    generate_keypair(folder / "other.key", folder / "other.pub")
    return folder


def fetched_kit(kit_dir: Path, out: Path, key_path: Path) -> Path:
    """What `sdr-client fetch --kit` leaves on a device: the kit plus the signed manifest."""
    return write_files_atomically(sign_kit(read_folder(kit_dir), load_private_key(key_path),
                                           {"run": "test"}), out)


@pytest.fixture(scope="module")
def signed_kit(tiny_run, keys, tmp_path_factory):
    return fetched_kit(tiny_run[0] / "kit", tmp_path_factory.mktemp("device") / "kit",
                       keys / "server.key")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp(), clustered=True)
    return run_dir, load_codes(run_dir)[0].numpy()


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


def test_cli_signature_does_not_import_torch(tiny_run, signed_kit, keys, image_folder, tmp_path):
    """`sdr-client signature --pubkey` in a fresh interpreter: verifies the kit, writes a valid
    signature naming the run, and torch never loads (verification included)."""
    run_dir, _ = tiny_run
    out, out_dp = tmp_path / "sig.json", tmp_path / "sig_dp.json"
    pub = str(keys / "server.pub")
    script = textwrap.dedent(f"""
        import sys
        from sdr_edge_client.cli import main
        rc = main(["signature", "--kit", {str(signed_kit)!r}, "--pubkey", {pub!r}, "--images",
                   {str(image_folder)!r}, "--out", {str(out)!r}])
        rc2 = main(["signature", "--kit", {str(signed_kit)!r}, "--pubkey", {pub!r}, "--images",
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
    assert '"skipped": 1' in proc.stdout and '"kit_verified": true' in proc.stdout
    sig = validate_signature(json.loads(out.read_text()), (2, 2))
    assert sig.count == 40 and sig.dp_epsilon is None
    assert sig.run_id == run_id_of(run_dir) is not None
    dp = validate_signature(json.loads(out_dp.read_text()), (2, 2))
    assert dp.dp_epsilon == 2.0 and dp.run_id == sig.run_id  # the run id costs no privacy
    assert len(out.read_bytes()) < 400


def test_cli_signature_errors_are_one_line(tiny_run, tmp_path):
    from sdr_edge_client.cli import main

    run_dir, _ = tiny_run
    insecure = "--insecure-no-verify"
    assert main(["signature", "--kit", str(run_dir / "kit"), insecure, "--images",
                 str(tmp_path / "no"), "--out", str(tmp_path / "s.json")]) == 2
    assert main(["signature", "--kit", str(run_dir / "kit"), insecure, "--images", str(tmp_path),
                 "--out", str(tmp_path / "s.json"), "--dp-epsilon", "-1"]) == 2
    assert main(["signature", "--kit", str(tmp_path), insecure, "--images", str(tmp_path),
                 "--out", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()


# --- trust: the device verifies the kit it runs; signatures carry the run's identity --------

def signature_cli(kit: Path, images: Path, out: Path, *trust: str) -> int:
    from sdr_edge_client.cli import main

    return main(["signature", "--kit", str(kit), *trust, "--images", str(images),
                 "--out", str(out)])


def test_kit_records_the_run_and_signatures_carry_it(tiny_run, signed_kit, keys):
    run_dir, _ = tiny_run
    info = json.loads((run_dir / "kit" / "kit.json").read_text())
    assert info["run_id"] == run_id_of(run_dir)
    assert len(info["run_id"]) == 16
    images = load_source("builtin:digits", 16, limit=30).images
    runner = KitRunner(signed_kit, pubkey=load_public_key(keys / "server.pub"))
    assert runner.verified and runner.run_id == info["run_id"]
    sig = compute_signature(runner, images)
    private = compute_signature(runner, images, dp_epsilon=1.0,
                                rng=np.random.default_rng(0))
    for s in (sig, private):
        assert validate_signature(json.loads(s.to_json()), (2, 2)).run_id == info["run_id"]


def test_codebooks_name_is_the_run_dirs():
    from sdr_edge.artifacts import run_dir
    from sdr_edge.routing import signature

    assert signature.RUN_ID_SOURCE == run_dir.CODEBOOKS


def test_tampered_onnx_with_matching_kit_json_is_refused(signed_kit, two_runs, keys,
                                                         image_folder, tmp_path, capsys):
    """kit.onnx swapped for another (valid) model and kit.json's sha256 updated to match:
    kit.json alone cannot tell, the signed manifest can; refused with one line naming the
    file, exit 2, nothing written."""
    import shutil

    from sdr_edge.artifacts.atomic import sha256_bytes

    kit = tmp_path / "kit"
    shutil.copytree(signed_kit, kit)
    onnx = (two_runs[1] / "kit" / "kit.onnx").read_bytes()
    (kit / "kit.onnx").write_bytes(onnx)
    info = json.loads((kit / "kit.json").read_text())
    info["files"]["kit.onnx"] = sha256_bytes(onnx)
    (kit / "kit.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    KitRunner(kit)  # the old check (kit.json's own sha256) is fooled
    with pytest.raises(KitError, match="checksum mismatch for kit.json"):
        KitRunner(kit, pubkey=load_public_key(keys / "server.pub"))
    out = tmp_path / "sig.json"
    assert signature_cli(kit, image_folder, out, "--pubkey", str(keys / "server.pub")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "kit refused" in err and "checksum mismatch for kit.json" in err and str(kit) in err
    assert not out.exists()


def test_kit_signed_by_another_key_or_unsigned_is_refused(tiny_run, signed_kit, keys,
                                                          image_folder, tmp_path, capsys):
    other = fetched_kit(tiny_run[0] / "kit", tmp_path / "other-kit", keys / "other.key")
    out = tmp_path / "sig.json"
    assert signature_cli(other, image_folder, out, "--pubkey", str(keys / "server.pub")) == 2
    err = capsys.readouterr().err
    assert "manifest.sig" in err and "does not verify" in err
    # RUN_DIR/kit carries no signed manifest: a device cannot verify it
    assert signature_cli(tiny_run[0] / "kit", image_folder, out,
                         "--pubkey", str(keys / "server.pub")) == 2
    assert "no signed manifest.json" in capsys.readouterr().err
    # a file slipped into a verified kit folder is not part of the signed kit
    slipped = tmp_path / "slipped"
    import shutil

    shutil.copytree(signed_kit, slipped)
    (slipped / "helper.onnx").write_bytes(b"x")
    assert signature_cli(slipped, image_folder, out, "--pubkey", str(keys / "server.pub")) == 2
    assert "not listed in the signed manifest: helper.onnx" in capsys.readouterr().err
    assert not out.exists()


def test_cli_requires_pubkey_or_an_explicit_insecure_flag(tiny_run, keys, image_folder,
                                                          tmp_path, capsys):
    kit, out = tiny_run[0] / "kit", tmp_path / "sig.json"
    assert signature_cli(kit, image_folder, out) == 2
    err = capsys.readouterr().err
    assert "--pubkey is required" in err and "--insecure-no-verify" in err
    assert not out.exists()
    with pytest.raises(SystemExit):  # both at once: argparse refuses (exit 2)
        signature_cli(kit, image_folder, out, "--pubkey", str(keys / "server.pub"),
                      "--insecure-no-verify")
    capsys.readouterr()
    assert signature_cli(kit, image_folder, out, "--insecure-no-verify") == 0
    captured = capsys.readouterr()
    assert "runs unverified" in captured.err and '"kit_verified": false' in captured.out
    assert json.loads(out.read_text())["run_id"] == run_id_of(tiny_run[0])
    assert signature_cli(kit, image_folder, out, "--pubkey", str(tmp_path / "nope.pub")) == 2
    assert "--pubkey file not found" in capsys.readouterr().err


def test_signature_run_id_field_and_aggregation():
    from sdr_edge.routing.signature import (
        RunIdMismatchError,
        Signature,
        SignatureValidationError,
        aggregate_signatures,
        check_run_id,
    )

    base = {"branching": [2, 2], "levels": [[0.5, 0.5], [0.2, 0.8]], "count": 3}
    for bad in ("ABCDEF0123456789", "123", 7, "0123456789abcdef0", "0123456789abcdef\n"):
        with pytest.raises(SignatureValidationError) as err:
            validate_signature({**base, "run_id": bad})
        assert err.value.field == "run_id"
    a = validate_signature({**base, "run_id": "0123456789abcdef"})
    check_run_id(a, "0123456789abcdef")
    with pytest.raises(RunIdMismatchError, match="another run's kit"):
        check_run_id(a, "fedcba9876543210")
    legacy = validate_signature(base)
    with pytest.raises(SignatureValidationError, match="missing.*recompute") as err:
        check_run_id(legacy, "0123456789abcdef")
    assert not isinstance(err.value, RunIdMismatchError)
    check_run_id(legacy, "0123456789abcdef", required=False)  # a legacy run's own clients
    assert aggregate_signatures([a, a]).run_id == a.run_id
    b = Signature(a.branching, a.levels, 2, None, "fedcba9876543210")
    with pytest.raises(ValueError, match="kit of run fedcba9876543210"):
        aggregate_signatures([a, b])


def _registry_client(run_dir: Path, tmp_path: Path):
    from fastapi.testclient import TestClient
    from helpers_registry import make_credentials

    from sdr_edge_server.registry.app import create_app

    key, _, tokens, token = make_credentials(tmp_path / "creds")
    app = create_app(run_dir, tokens, key, tmp_path / "cache")
    return TestClient(app, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs with the same branching, different seeds: different codes, different ids."""
    from helpers_rundir import build_tiny_run

    base = tmp_path_factory.mktemp("two-runs")
    return build_tiny_run(base / "a", seed=0), build_tiny_run(base / "b", seed=5)


def test_registry_refuses_a_signature_from_another_runs_kit(two_runs, tmp_path):
    run_a, run_b = two_runs
    assert run_id_of(run_a) != run_id_of(run_b)
    images = load_source("builtin:digits", 16, limit=40, seed=3).images
    own = compute_signature(run_a / "kit", images)
    foreign = compute_signature(run_b / "kit", images)
    assert foreign.branching == own.branching  # same shape: only the run id tells them apart
    with _registry_client(run_a, tmp_path) as client:
        info = client.get("/v1/info").json()
        assert info["run_id"] == run_id_of(run_a)
        ok = client.post("/v1/route", json=own.to_dict())
        assert ok.status_code == 200, ok.text
        assert tuple(ok.json()["route"]) == route_signature(own)
        r = client.post("/v1/route", json=foreign.to_dict())
        assert r.status_code == 409, r.text
        assert r.json()["field"] == "run_id"
        detail = r.json()["detail"]
        assert run_id_of(run_b) in detail and run_id_of(run_a) in detail
        assert "sdr-client fetch --kit" in detail
        old = {k: v for k, v in own.to_dict().items() if k != "run_id"}  # an older client
        r = client.post("/v1/route", json=old)
        assert r.status_code == 422 and r.json()["field"] == "run_id"
        assert "recompute" in r.json()["detail"]
        schema = client.get("/openapi.json").json()
        route_op = schema["paths"]["/v1/route"]["post"]
        assert "409" in route_op["responses"]
        body = route_op["requestBody"]["content"]["application/json"]["schema"]
        assert "run_id" in body["properties"]


def test_legacy_run_without_kit_run_id_still_routes_its_old_signatures(two_runs, tmp_path):
    """A run whose kit predates run ids: its clients' signatures carry none and are accepted;
    one naming another run is still refused."""
    import shutil

    run = tmp_path / "legacy"
    shutil.copytree(two_runs[0], run)
    info = json.loads((run / "kit" / "kit.json").read_text())
    del info["run_id"]
    (run / "kit" / "kit.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    images = load_source("builtin:digits", 16, limit=20, seed=3).images
    old = compute_signature(run / "kit", images)
    assert old.run_id is None
    with _registry_client(run, tmp_path) as client:
        assert client.post("/v1/route", json=old.to_dict()).status_code == 200
        foreign = compute_signature(two_runs[1] / "kit", images)
        assert client.post("/v1/route", json=foreign.to_dict()).status_code == 409


def test_federation_refuses_nodes_with_kits_of_other_runs(two_runs):
    from types import SimpleNamespace

    from sdr_edge.federated.server_flow import NodeAnswer, QueryOutcome, choose_route
    from sdr_edge.federated.strategy import FederationError

    images = load_source("builtin:digits", 16, limit=20, seed=3).images
    sigs = [compute_signature(run / "kit", images) for run in two_runs]
    outcome = QueryOutcome({i: NodeAnswer(i, s, 10, ()) for i, s in enumerate(sigs)})
    cfg = SimpleNamespace(fixed_route=lambda: None)
    with pytest.raises(FederationError, match="every node needs the same kit"):
        choose_route(cfg, outcome)  # type: ignore[arg-type]


def test_federation_from_a_run_dir_checks_the_nodes_run(two_runs):
    from types import SimpleNamespace

    from sdr_edge.federated.server_flow import load_start_model
    from sdr_edge.federated.strategy import FederationError

    images = load_source("builtin:digits", 16, limit=20, seed=3).images
    own, foreign = (compute_signature(run / "kit", images) for run in two_runs)
    cfg = SimpleNamespace(run_dir=str(two_runs[0]), fixed_route=lambda: None)
    start = load_start_model(cfg, route_signature(own), own)  # type: ignore[arg-type]
    assert start.route == route_signature(own)
    with pytest.raises(FederationError, match="another run's kit"):
        load_start_model(cfg, route_signature(foreign), foreign)  # type: ignore[arg-type]
