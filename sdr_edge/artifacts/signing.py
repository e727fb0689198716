"""Ed25519 keys and detached signatures for manifests (the server signs, clients verify)."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdr_edge.artifacts.atomic import atomic_write_bytes
from sdr_edge.errors import SdrEdgeError


class SignatureError(SdrEdgeError, ValueError):
    """A manifest signature is missing, malformed or does not verify."""


def generate_keypair(private_path: str | Path, public_path: str | Path) -> None:
    """Write a new PKCS#8 PEM private key (mode 0600) and its PEM public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(private_path, pem)
    Path(private_path).chmod(0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(public_path, pub)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Base64 text of the signature (what manifest.sig holds)."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(key: Ed25519PublicKey, data: bytes, signature_b64: bytes) -> None:
    """Raise SignatureError unless signature_b64 signs data under key."""
    try:
        raw = base64.b64decode(signature_b64.strip(), validate=True)
    except ValueError as exc:
        raise SignatureError("signature is not valid base64") from exc
    try:
        key.verify(raw, data)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify with the given public key") from exc
