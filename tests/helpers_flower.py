"""Real Flower Deployment Engine processes on loopback for the end-to-end tests.

The processes themselves are run by the library's `sdr_edge.fleet.deployment.Fleet` (the
demo uses the same class); this module adds the tests' shared assets and node configs.
"""

from __future__ import annotations

from pathlib import Path

from sdr_edge.fleet.deployment import CONNECTION, Fleet, FleetError, free_port, kv_config

__all__ = ["CONNECTION", "Fleet", "FleetError", "digits_node", "federation_assets", "free_port",
           "kv_config"]


def federation_assets(base: Path) -> dict[str, Path]:
    """A tiny run dir with its signature kit and a signing key pair, built once per session."""
    from helpers_rundir import shared_tiny_run

    from sdr_edge.artifacts.signing import generate_keypair

    run_dir = shared_tiny_run(base)
    key, pub = base / "federation.key", base / "federation.pub"
    if not pub.is_file():
        generate_keypair(key, pub)
    return {"run_dir": run_dir, "kit_dir": run_dir / "kit", "key": key, "pub": pub}


def digits_node(i: int, n: int, kit_dir: Path, **extra: object) -> dict[str, object]:
    return {"data": "builtin:digits", "partition-id": i, "num-partitions": n,
            "kit-dir": str(kit_dir), **extra}
