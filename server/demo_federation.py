"""The demo's federation step: a SuperLink and one SuperNode per client on loopback, `flwr run`."""

from __future__ import annotations

import json
from pathlib import Path

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.errors import SdrEdgeError
from sdr_edge.fleet.deployment import Fleet, FleetError


class FederationFailed(SdrEdgeError, RuntimeError):
    """The Flower run did not complete; the message carries the processes' logs."""


def run_federation(out: Path, run_dir: Path, keys: Path, folders: dict[str, dict[str, Path]],
                   rounds: int) -> dict:
    """Fine-tune the routed sub-net across the clients; return per-round metrics."""
    fed_out = out / "federated"
    fleet = Fleet(out / "flower")
    try:
        print("$ flower-superlink --insecure &   (logs under OUT/flower/logs)", flush=True)
        fleet.start_superlink()
        for name, f in folders.items():
            kit = out / "clients" / name / "kit"
            print(f"$ flower-supernode --insecure --node-config 'data=\"{f['train']}\" "
                  f"kit-dir=\"{kit}\"' &", flush=True)
            fleet.start_supernode(name, {"data": str(f["train"]), "kit-dir": str(kit),
                                         "test-fraction": 0.2})
        fleet.wait_for_nodes(len(folders))
        config = {"run-dir": str(run_dir), "signing-key": str(keys / "server.key"),
                  "out-dir": str(fed_out), "num-server-rounds": rounds, "local-epochs": 2,
                  "round-timeout": 300.0, "node-wait-timeout": 120.0}
        print(f"$ flwr run . local --stream --run-config '{_kv(config)}'", flush=True)
        fleet.run_app(config)
        status = fleet.final_status()
        if status.get("status") != "finished:completed":
            raise FederationFailed(f"Flower run ended {status.get('status')}\n{fleet.all_logs()}")
    except FleetError as exc:
        raise FederationFailed(str(exc)) from exc
    finally:
        fleet.close()
    report = json.loads((fed_out / "summary.json").read_text())
    bundle = load_bundle(fed_out / "bundle", load_public_key(keys / "server.pub"))
    rows = [{"round": r["round"], "accuracy": r.get("eval-accuracy"), "loss": r.get("eval-loss")}
            for r in report["rounds"]]
    plot = fed_out / "report" / "federated_rounds.png"
    return {"route": list(bundle.route), "rounds": rows, "bundle": str(fed_out / "bundle"),
            "bundle_verified": True,
            "plot": str(plot.relative_to(out)) if plot.exists() else None,  # report-relative
            "summary": report["summary"]}


def _kv(values: dict) -> str:
    from sdr_edge.fleet.deployment import kv_config

    return kv_config(values)
