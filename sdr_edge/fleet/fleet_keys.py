"""Keys for a real Flower fleet: a private CA + SuperLink TLS certificate, SuperNode auth keys.

Written with `cryptography` so no openssl / ssh-keygen is needed:

    ca.crt, ca.key              self-signed CA (give ca.crt to SuperNodes and the flwr CLI)
    server.pem, server.key      SuperLink certificate for the given host names / IPs
    supernode-<i>, .pub         ECDSA P-384 key pair per SuperNode, OpenSSH format (what
                                `flower-supernode --auth-supernode-private-key` and
                                `flwr supernode register` read)

Private keys are written atomically with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdr_edge.artifacts.atomic import atomic_write_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def planned_files(tls: bool, names: Sequence[str]) -> dict[str, str]:
    """Every file a fleet-keys run writes, with its kind (so --force can check what it replaces)."""
    kinds = ({CA_CERT: "cert", CA_KEY: "ec-key", SERVER_CERT: "cert", SERVER_KEY: "ec-key"}
             if tls else {})
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad SuperNode key name {name!r}")
        kinds[name], kinds[f"{name}.pub"] = "ssh-key", "ssh-pub"
    return kinds


def is_fleet_file(path: Path, kind: str) -> bool:
    """Whether `path` is the kind of file fleet-keys writes (an EC P-384 key or its certificate).

    `--force` replaces only such files: an Ed25519 bundle-signing `server.key` from
    `sdr-server keygen`, or any other file, is never overwritten.
    """
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = path.read_bytes()
        if kind == "cert":
            x509.load_pem_x509_certificate(data)
            return True
        if kind == "ec-key":
            key = serialization.load_pem_private_key(data, password=None)
        elif kind == "ssh-key":
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, OSError, UnsupportedAlgorithm):
        return False
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)


def _write_private(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    path.chmod(0o600)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    path.chmod(0o644)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS,
                   days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink server certificate valid for `hosts` (DNS names or IPs)."""
    if not hosts:
        raise ValueError("at least one host name or IP is needed for the server certificate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdr-edge fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    files = {
        "ca_cert": _write_public(out / CA_CERT, ca.public_bytes(pem)),
        "ca_key": _write_private(out / CA_KEY, _pem_key(ca_key)),
        "server_cert": _write_public(out / SERVER_CERT, cert.public_bytes(pem)),
        "server_key": _write_private(out / SERVER_KEY, _pem_key(key)),
    }
    return files


def make_supernode_keys(out_dir: str | Path, names: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """One ECDSA P-384 OpenSSH key pair per SuperNode name: name -> (private, public)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad SuperNode key name {name!r}")
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        pairs[name] = (_write_private(out / name, private),
                       _write_public(out / f"{name}.pub", public + f" {name}\n".encode()))
    return pairs
