"""Create the TLS certificates and SuperNode authentication keys of a Flower fleet.

Writes into --out: ca.crt / ca.key (a private CA), server.pem / server.key (the SuperLink's
certificate for --hosts), and supernode-<i> / supernode-<i>.pub (OpenSSH ECDSA P-384 pairs,
one per SuperNode; register each .pub with `flwr supernode register`). See docs/federation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdr_edge.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for the keys")
    parser.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                        help="comma-separated names/IPs the SuperLink is reached at")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="how many SuperNode key pairs to create (0: none)")
    parser.add_argument("--prefix", default="supernode", help="SuperNode key file prefix")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days")
    parser.add_argument("--no-tls", action="store_true", help="only the SuperNode keys")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    from sdr_edge.fleet.fleet_keys import (
        is_fleet_file,
        make_supernode_keys,
        make_tls_files,
        planned_files,
    )

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if args.supernodes < 0 or args.days < 1:
        raise CommandError("--supernodes must be >= 0 and --days >= 1")
    names = [f"{args.prefix}-{i}" for i in range(1, args.supernodes + 1)]
    if args.out.is_symlink() or (args.out.exists() and not args.out.is_dir()):
        raise CommandError(f"--out {args.out} exists and is not a folder")
    planned = planned_files(not args.no_tls, names)
    existing = [n for n in planned if (args.out / n).exists() or (args.out / n).is_symlink()]
    if existing and not args.force:
        raise CommandError(f"{args.out} already holds {', '.join(existing)} (use --force to "
                           "replace them; registered SuperNode keys would stop working)")
    foreign = [n for n in existing if not is_fleet_file(args.out / n, planned[n])]
    if foreign:
        kind = {"cert": "a PEM certificate", "ec-key": "a PEM EC private key",
                "ssh-key": "an OpenSSH EC private key", "ssh-pub": "an OpenSSH EC public key"}
        raise CommandError(f"{args.out / foreign[0]} was not written by fleet-keys (not "
                           f"{kind[planned[foreign[0]]]}); refusing to replace it even with "
                           "--force: move it away or pick another --out")
    if not args.no_tls:
        files = make_tls_files(args.out, hosts, args.days)
        print(f"CA certificate:     {files['ca_cert']}")
        print(f"SuperLink TLS:      {files['server_cert']} + {files['server_key']} "
              f"(hosts: {', '.join(hosts)})")
    for name, (private, public) in make_supernode_keys(args.out, names).items():
        print(f"SuperNode {name}: {private} (keep on the node) + {public} (register it)")
    return 0
