"""Flower's Simulation Engine: `flwr run . local-simulation` from the repository root.

Flower 1.42 runs a simulation through a SuperLink connection whose address is `:local:`:
`flwr run` starts a managed `flower-superlink --simulation` (detached, on the ports
$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / $FLWR_LOCAL_CONTROL_API_PORT), which runs the ServerApp
and the Ray backend's virtual SuperNodes. Those nodes get only `partition-id` and
`num-partitions`; the ClientApp takes data and kit from the run config
(`node_data.with_simulation_defaults`). This test runs one real round that way, in its own
FLWR_HOME, and stops the managed SuperLink it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_flower import free_port, kv_config

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data, with_simulation_defaults

pytest.importorskip("ray", reason="the Simulation Engine needs the simulation extra (Ray)")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
# The connection docs/federation.md tells users to add to $FLWR_HOME/config.toml.
CONNECTION = '[superlink]\ndefault = "local"\n\n[superlink.local-simulation]\naddress = ":local:"\n'


def test_simulated_nodes_take_data_and_kit_from_the_run():
    run = {"run-dir": "/srv/run", "sim-data": "builtin:digits", "sim-partition": "dirichlet",
           "sim-alpha": 0.3, "sim-limit": 500, "seed": 7}
    node = with_simulation_defaults({"partition-id": 1, "num-partitions": 4}, run)
    assert node == {"partition-id": 1, "num-partitions": 4, "data": "builtin:digits",
                    "alpha": 0.3, "limit": 500, "partition-seed": 7, "kit-dir": "/srv/run/kit"}
    cfg = NodeDataConfig.from_node_config(node)
    assert (cfg.alpha, cfg.limit, cfg.partition_id) == (0.3, 500, 1)
    iid = with_simulation_defaults({"partition-id": 0, "num-partitions": 2},
                                   {**run, "sim-partition": "iid"})
    assert "alpha" not in iid
    # a SuperNode started with its own node config keeps it (a missing data is still an error)
    own = {"data": "/data", "partition-id": 0, "num-partitions": 2}
    assert with_simulation_defaults(own, run) == own
    assert with_simulation_defaults({}, run) == {}
    assert with_simulation_defaults({"kit-dir": "k", "partition-id": 0}, run) == \
        {"kit-dir": "k", "partition-id": 0}


def _managed_superlinks(home: Path) -> list[int]:
    """PIDs of the `flower-superlink` that `flwr run` started for this FLWR_HOME (its log
    file is under it: nobody else's SuperLink matches)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if any(b"flower-superlink" in c for c in cmd) and \
                    any(str(home).encode() in c for c in cmd):
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(CONNECTION)
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # sdr-edge is installed here
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    yield home, env
    for pid in _managed_superlinks(home):  # detached in its own session: stop that session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _flwr(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_flwr_run_local_simulation_runs_one_round(flwr_home, assets, tmp_path):
    home, env = flwr_home
    out = tmp_path / "out"
    before = (REPO / "pyproject.toml").read_bytes()
    run_config = {"run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
                  "out-dir": str(out), "num-server-rounds": 1, "local-epochs": 1,
                  "sim-limit": 400, "evaluate-start": False, "round-timeout": 120.0,
                  "node-wait-timeout": 60.0}
    res = _flwr(env, "run", ".", "local-simulation", "--stream", "--run-config",
                kv_config(run_config), "--federation-config", "num-supernodes=2")
    streamed = res.stdout + res.stderr
    log = home / "local-superlink" / "superlink.log"
    logs = f"{streamed}\n{log.read_text(errors='replace')[-4000:] if log.exists() else ''}"
    assert res.returncode == 0, logs
    runs = json.loads(_flwr(env, "ls", "local-simulation", "--format", "json",
                            timeout=60).stdout or "{}").get("runs", [])
    assert runs and runs[-1]["status"] == "finished:completed", f"{runs}\n{logs}"
    assert (REPO / "pyproject.toml").read_bytes() == before  # flwr run rewrote nothing

    report = json.loads((out / "summary.json").read_text())
    summary, rounds = report["summary"], {r["round"]: r for r in report["rounds"]}
    assert len(summary["nodes"]) == 2 and rounds[1]["train_ok"] == 2
    # the two partitions of sim-limit images the engine's partition-ids named, no more
    shares = [load_node_data(NodeDataConfig("builtin:digits", i, 2, limit=400), 16, 1)
              for i in range(2)]
    assert summary["images"] == 400 == sum(len(s.all_images()) for s in shares)
    load_bundle(out / "bundle", load_public_key(assets["pub"]))
