"""TLS + SuperNode authentication on loopback with keys from `sdr-server fleet-keys`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from helpers_flower import CONNECTION, Fleet, digits_node, federation_assets

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge_server.cli import main as server_main

BIN = Path(sys.executable).parent


def make_keys(out: Path, supernodes: int = 2) -> None:
    res = subprocess.run([str(BIN / "sdr-server"), "fleet-keys", "--out", str(out),
                          "--supernodes", str(supernodes)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_fleet_keys_make_a_verifiable_chain_and_ssh_keys(tmp_path, capsys):
    make_keys(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = load_ssh_private_key((tmp_path / "supernode-1").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub = load_ssh_public_key((tmp_path / "supernode-1.pub").read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert (tmp_path / "supernode-2").stat().st_mode & 0o077 == 0  # private keys are 0600
    # Regenerating would orphan registered SuperNodes: refused without --force.
    assert server_main(["fleet-keys", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_tls_and_supernode_authentication_on_loopback(tmp_path, tmp_path_factory):
    assets = federation_assets(tmp_path_factory.getbasetemp())
    keys = tmp_path / "keys"
    make_keys(keys)
    fleet = Fleet(tmp_path / "fleet", tls_dir=keys, auth=True)
    try:
        fleet.start_superlink()
        assert "https://" in fleet.log("superlink")
        res = fleet.flwr("supernode", "register", str(keys / "supernode-1.pub"), CONNECTION,
                         "--format", "json")
        assert json.loads(res.stdout[res.stdout.find("{"):])["success"], res.stdout + res.stderr

        fleet.start_supernode("registered", digits_node(0, 1, assets["kit_dir"]),
                              auth_key=keys / "supernode-1")
        stranger = fleet.start_supernode("unregistered", digits_node(0, 1, assets["kit_dir"]),
                                         auth_key=keys / "supernode-2",
                                         extra=["--max-retries", "2"])
        fleet.wait_for_nodes(1)
        assert stranger.wait(timeout=120) != 0  # refused, and it gives up
        assert "Failed to activate SuperNode" in fleet.log("unregistered")
        assert "No SuperNode found with the given public key" in fleet.log("superlink")
        time.sleep(1)
        assert len(fleet.online_nodes()) == 1

        out_dir = tmp_path / "out"
        streamed = fleet.run_app({"run-dir": str(assets["run_dir"]),
                                  "signing-key": str(assets["key"]), "out-dir": str(out_dir),
                                  "num-server-rounds": 1, "local-epochs": 1,  # TLS, not accuracy
                                  "min-nodes": 1, "min-round-nodes": 1,
                                  "evaluate-start": False, "round-timeout": 120.0,
                                  "node-wait-timeout": 60.0})
        status = fleet.final_status()
        assert status["status"] == "finished:completed", f"{status}\n{streamed}\n{fleet.all_logs()}"
        bundle = load_bundle(out_dir / "bundle", load_public_key(assets["pub"]))
        assert len(bundle.manifest["provenance"]["federated"]["nodes"]) == 1
    finally:
        fleet.close()
