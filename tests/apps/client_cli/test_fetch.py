"""`sdr-client fetch` and the registry client against a real registry process: trust rules."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import tarfile

import httpx
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from helpers_registry import make_credentials, serve_registry
from helpers_rundir import TINY_BRANCHING, TINY_SPEC, shared_tiny_run

from sdr_edge.artifacts import bundle as bundle_mod
from sdr_edge.artifacts import transfer
from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.run_dir import load_sdrnet
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.artifacts.transfer import TransferError, pack_files, unpack_files
from sdr_edge.registry_client import RegistryError, fetch_bundle, get_kit, post_route
from sdr_edge.routing.signature import route_signature, run_id_of
from sdr_edge_client.cli import main as client_main
from sdr_edge_server.cli import main as server_main

SIG = {"format": "sdr-signature", "version": 1, "branching": list(TINY_BRANCHING),
       "levels": [[0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.5, 0.2, 0.2, 0.1],
                  [0.2, 0.2, 0.2, 0.4]], "count": 30}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    SIG["run_id"] = run_id_of(run_dir)  # signatures name the served run (its kit's run id)
    with serve_registry(run_dir, tmp_path_factory.mktemp("fetch-registry")) as reg:
        yield reg


def fetch_cli(registry, out, *target: str, pubkey=None) -> int:
    return client_main(["fetch", "--server", registry.url, "--token", registry.token, *target,
                        "--pubkey", str(pubkey or registry.pubkey), "--out", str(out)])


def assert_nothing_left(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.slow
def test_fetched_bundle_verifies_and_equals_the_extracted_subnet(registry, tmp_path, capsys):
    sig_path = tmp_path / "signature.json"
    sig_path.write_text(json.dumps(SIG))
    assert fetch_cli(registry, tmp_path / "bundle", "--signature", str(sig_path)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["route"] == [1, 3, 0, 3] and printed["verified"] is True
    bundle = load_bundle(tmp_path / "bundle", load_public_key(registry.pubkey))
    assert bundle.route == (1, 3, 0, 3) and bundle.input_spec == TINY_SPEC
    net, _ = load_sdrnet(registry.run_dir)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), net.extract((1, 3, 0, 3)).eval()(x))
        # and it is not just any sub-net: another route gives other features
        assert not torch.allclose(bundle.model(x), net.extract((0, 3, 0, 3)).eval()(x))


@pytest.mark.slow
def test_kit_signature_route_and_fetch_end_to_end(registry, tmp_path):
    from sdr_edge.data.sources import load_source
    from sdr_edge.routing.kit_runtime import compute_signature

    kit_dir = get_kit(registry.url, registry.token, registry.pubkey, tmp_path / "kit")
    assert {"kit.onnx", "kit.json", "manifest.json", "manifest.sig"} <= {
        p.name for p in kit_dir.iterdir()}
    images = load_source("builtin:digits", 16, 1, limit=40, seed=3).images
    sig = compute_signature(kit_dir, images)
    answer = post_route(registry.url, registry.token, sig)
    assert tuple(answer["route"]) == route_signature(sig)
    out = fetch_bundle(registry.url, registry.token, sig, registry.pubkey, tmp_path / "b")
    assert json.loads((out / "manifest.json").read_text())["route"] == answer["route"]


def _tamper_cached_archive(registry, route_id: str, edit) -> None:
    path = registry.cache_dir / f"{route_id}.tar"
    files = unpack_files(path.read_bytes())
    edit(files)
    path.write_bytes(pack_files(files))


@pytest.mark.slow
def test_flipped_byte_is_refused_and_nothing_is_written(registry, tmp_path, capsys):
    route_id = "0-1-2-3"
    assert fetch_cli(registry, tmp_path / "first", "--route", route_id) == 0  # fills the cache

    def flip(files):
        data = bytearray(files["weights.safetensors"])
        data[-7] ^= 0x01
        files["weights.safetensors"] = bytes(data)

    _tamper_cached_archive(registry, route_id, flip)
    capsys.readouterr()
    out = tmp_path / "out"
    assert fetch_cli(registry, out, "--route", route_id) == 2
    assert "checksum mismatch for weights.safetensors" in capsys.readouterr().err
    assert_nothing_left(out)


@pytest.mark.slow
def test_unsigned_or_extra_file_or_wrong_key_is_refused(registry, tmp_path, capsys):
    route_id = "3-3-3-3"
    assert fetch_cli(registry, tmp_path / "first", "--route", route_id) == 0
    other_pub = make_credentials(tmp_path / "other")[1]
    capsys.readouterr()
    assert fetch_cli(registry, tmp_path / "o1", "--route", route_id, pubkey=other_pub) == 2
    assert "does not verify" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "o1")

    _tamper_cached_archive(registry, route_id, lambda f: f.update({"extra.py": b"print(1)"}))
    assert fetch_cli(registry, tmp_path / "o2", "--route", route_id) == 2
    assert "not listed in the signed manifest: extra.py" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "o2")

    _tamper_cached_archive(registry, route_id, lambda f: f.pop("manifest.sig"))
    assert fetch_cli(registry, tmp_path / "o3", "--route", route_id) == 2
    assert "unsigned bundle" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "o3")


@pytest.mark.slow
def test_fetch_errors_are_clear(registry, tmp_path, capsys):
    assert client_main(["fetch", "--server", registry.url, "--token", "sdr_nope", "--route",
                        "0-0-0-0", "--pubkey", str(registry.pubkey),
                        "--out", str(tmp_path / "o")]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SIG, "count": -1}))
    assert fetch_cli(registry, tmp_path / "o", "--signature", str(bad)) == 2
    assert "(field count)" in capsys.readouterr().err
    assert fetch_cli(registry, tmp_path / "o", "--route", "9-0-0-0") == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "route digit 9 at level 0 is out of range" in err
    with pytest.raises(RegistryError, match="cannot reach"):
        post_route("http://127.0.0.1:9", registry.token, SIG)
    assert_nothing_left(tmp_path / "o")


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


@pytest.mark.parametrize("members,message", [
    ([(_info("../evil", 1), b"x")], "not a plain file name"),
    ([(_info("/etc/passwd", 1), b"x")], "not a plain file name"),
    ([(_info("sub/file", 1), b"x")], "not a plain file name"),
    ([(_info(".hidden", 1), b"x")], "not a plain file name"),
    ([(_info("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), None)], "not a regular file"),
    ([(_info("hard", kind=tarfile.LNKTYPE, link="weights.safetensors"), None)],
     "not a regular file"),
    ([(_info("dev", kind=tarfile.CHRTYPE), None)], "not a regular file"),
    ([(_info("dir", kind=tarfile.DIRTYPE), None)], "not a regular file"),
    ([(_info("a", 1), b"x"), (_info("a", 1), b"y")], "twice"),
])
def test_unpack_refuses_unsafe_members(members, message):
    with pytest.raises(TransferError, match=message):
        unpack_files(_tar(members))


def test_unpack_refuses_garbage_and_oversize():
    with pytest.raises(TransferError, match="not a valid tar"):
        unpack_files(b"\x00garbage" * 100)
    with pytest.raises(TransferError, match="over the limit"):
        unpack_files(pack_files({"a": b"x" * 2048}), max_bytes=1024)
    with pytest.raises(TransferError, match="more than 2 files"):
        unpack_files(pack_files({"a": b"1", "b": b"2", "c": b"3"}), max_files=2)


def test_transfer_names_match_bundle_module():
    assert (transfer.MANIFEST, transfer.SIGNATURE) == (bundle_mod.MANIFEST, bundle_mod.SIGNATURE)
    from sdr_edge.artifacts.signed import manifest_bytes

    kit = transfer.sign_kit({"kit.json": b"{}"}, Ed25519PrivateKey.generate())
    assert kit[transfer.MANIFEST] == manifest_bytes(json.loads(kit[transfer.MANIFEST]))


def test_token_and_keygen_commands(tmp_path, capsys):
    tokens = tmp_path / "tokens.txt"
    assert server_main(["token", "--tokens", str(tokens), "--name", "edge-1"]) == 0
    token = capsys.readouterr().out.strip()
    text = tokens.read_text()
    assert token.startswith("sdr_") and token not in text and text.startswith("edge-1 sha256:")
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    assert server_main(["token", "--tokens", str(tokens), "--name", "edge-1"]) == 2
    assert "already has a token named 'edge-1'" in capsys.readouterr().err
    assert server_main(["token", "--tokens", str(tokens), "--name", "../x"]) == 2
    from sdr_edge_server.registry.auth import TokenStore

    store = TokenStore.load(tokens)
    assert store.check(token) == "edge-1" and store.check(token + "x") is None
    assert server_main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert server_main(["keygen", "--out", str(tmp_path / "k")]) == 2
    assert "--force" in capsys.readouterr().err
    serve = ["serve", "--run", str(tmp_path / "nope"), "--tokens", str(tokens),
             "--key", str(tmp_path / "k" / "server.key")]
    assert server_main(serve) == 2
    assert "--run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert server_main([*serve[:2], str(tmp_path / "empty"), *serve[3:], "--tls-cert", "x"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert server_main([*serve[:2], str(tmp_path / "empty"), *serve[3:]]) == 2
    assert "missing sdrnet.safetensors" in capsys.readouterr().err


def _self_signed(folder) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdr-edge test registry")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.slow
def test_tls_serving_with_a_self_signed_certificate(tmp_path_factory, tmp_path, capsys):
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    cert, key = _self_signed(tmp_path)
    with serve_registry(run_dir, tmp_path / "srv", tls=(cert, key), cacert=cert) as reg:
        assert reg.url.startswith("https://")
        assert client_main(["fetch", "--server", reg.url, "--token", reg.token, "--route",
                            "1-0-0-1", "--pubkey", str(reg.pubkey), "--out", str(tmp_path / "b"),
                            "--cacert", str(cert)]) == 0
        assert load_bundle(tmp_path / "b", load_public_key(reg.pubkey)).route == (1, 0, 0, 1)
        capsys.readouterr()
        assert client_main(["fetch", "--server", reg.url, "--token", reg.token, "--route",
                            "1-0-0-1", "--pubkey", str(reg.pubkey),
                            "--out", str(tmp_path / "c")]) == 2
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        assert_nothing_left(tmp_path / "c")
        with pytest.raises(httpx.HTTPError):
            httpx.get(reg.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_top_routes_agree_with_score_routes():
    from sdr_edge.routing.signature import Signature, score_routes
    from sdr_edge_server.registry.scoring import TopRoutes

    rng = np.random.default_rng(0)
    top = TopRoutes((4, 3, 5))
    for trial in range(20):
        levels = [rng.dirichlet(np.ones(b)).tolist() for b in (4, 3, 5)]
        if trial % 4 == 0:  # ties and zeros
            levels[1] = [0.5, 0.5, 0.0]
        sig = Signature((4, 3, 5), levels, 10)
        expected = score_routes(sig)[:7]
        got = top(sig, 7)
        assert [r for r, _ in got] == [r for r, _ in expected]
        assert np.allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-12)


def test_create_app_names_what_is_missing(tmp_path):
    from helpers_registry import make_credentials

    from sdr_edge.artifacts.run_dir import RunDirError
    from sdr_edge_server.registry.app import create_app

    key, _, tokens, _ = make_credentials(tmp_path / "creds")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(RunDirError, match="missing sdrnet.safetensors"):
        create_app(tmp_path / "empty-run", tokens, key, tmp_path / "cache")


def _digit_folder(root, per_class: int = 6):
    import cv2

    from sdr_edge.data.sources import load_source

    src = load_source("builtin:digits", 16, 1, limit=200, seed=0)
    for cls in (0, 1, 2):
        folder = root / f"class{cls}"
        folder.mkdir(parents=True)
        for i, img in enumerate(src.images[src.labels == cls][:per_class]):
            cv2.imwrite(str(folder / f"{i}.png"), img)
    return root


@pytest.mark.slow
def test_rerank_keeps_the_best_scored_of_the_top_m(registry, tmp_path, capsys):
    sig_path = tmp_path / "signature.json"
    sig_path.write_text(json.dumps(SIG))
    images = _digit_folder(tmp_path / "images")
    top = post_route(registry.url, registry.token, SIG, top=4)["scores"]
    assert len(top) == 4
    # consensus clusters the images into 16, 32 and 64 groups: it gets a larger folder (3 x 15)
    larger = _digit_folder(tmp_path / "larger", per_class=15)
    for method in ("knn", "rankme", "probe", "consensus"):
        out = tmp_path / f"bundle-{method}"
        folder = larger if method == "consensus" else images
        assert fetch_cli(registry, out, "--signature", str(sig_path), "--rerank", method,
                         "--top-m", "4", "--images", str(folder)) == 0
        printed = json.loads(capsys.readouterr().out)
        assert [c["route"] for c in printed["candidates"]] == [r["route"] for r in top]
        best = max(range(4), key=lambda i: (printed["candidates"][i]["score"], -i))
        assert printed["route"] == top[best]["route"] == printed["candidates"][best]["route"]
        assert printed["signature_rank"] == best + 1
        assert printed["images"] == (45 if method == "consensus" else 18)
        assert load_bundle(out, load_public_key(registry.pubkey)).route == tuple(printed["route"])
        assert printed["bytes_downloaded"] > 4 * (out / "weights.safetensors").stat().st_size


@pytest.mark.slow
def test_rerank_errors_are_one_line(registry, tmp_path, capsys):
    sig_path = tmp_path / "signature.json"
    sig_path.write_text(json.dumps(SIG))
    flat = tmp_path / "flat"
    _digit_folder(tmp_path / "nested")
    flat.mkdir()
    for p in (tmp_path / "nested" / "class0").iterdir():
        p.rename(flat / p.name)
    cases = [(["--rerank", "logme", "--images", str(flat)], "need labels"),
             (["--rerank", "rankme"], "needs --images"),
             (["--rerank", "rankme", "--images", str(flat), "--top-m", "0"], "between 1 and 64"),
             (["--images", str(flat)], "only used with --rerank"),
             # the consensus needs more images than its smallest clustering (16); 6 here
             (["--rerank", "consensus", "--images", str(flat)], "more than 16 local images, got")]
    for extra, message in cases:
        assert fetch_cli(registry, tmp_path / "b", "--signature", str(sig_path), *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert_nothing_left(tmp_path / "b")
    with httpx.Client(base_url=registry.url,
                      headers={"Authorization": f"Bearer {registry.token}"}) as client:
        assert client.post("/v1/route", json=SIG, params={"top": 0}).status_code == 422
        assert client.post("/v1/route", json=SIG, params={"top": 65}).status_code == 422
        assert len(client.post("/v1/route", json=SIG, params={"top": 7}).json()["scores"]) == 7
