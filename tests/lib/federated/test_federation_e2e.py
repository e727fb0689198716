"""End-to-end on Flower's Deployment Engine: a real SuperLink, two real SuperNodes, `flwr run`.

One SuperNode is started by the on-device agent (`sdr-client agent`), which first fetched the
kit and its sub-net from a real registry; the other is a plain `flower-supernode`. The
ServerApp takes the routed sub-net from the same registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from helpers_flower import Fleet, digits_node, federation_assets
from helpers_registry import serve_registry

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data
from sdr_edge.training.finetune import evaluate_local
from sdr_edge_client.agent import STATE_FILE

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet")
    yield f
    f.close()
    state = tmp_path / "agent" / "state" / STATE_FILE
    if state.is_file():  # the agent's SuperNode runs in its own session
        pid = json.loads(state.read_text())["steps"].get("federation", {}).get("supernode_pid")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def agent_config(folder: Path, registry, fleet: Fleet, pub: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "token").write_text(registry.token)
    path = folder / "agent.toml"
    path.write_text(f"""
[agent]
data = "builtin:digits"
state_dir = "state"

[registry]
url = "{registry.url}"
token_file = "token"
pubkey = "{registry.pubkey}"

[federation]
superlink = "127.0.0.1:{fleet.port}"
insecure = true
pubkey = "{pub}"
timeout = 600
node_config = {{ partition-id = 0, num-partitions = 2 }}
""")
    return path


def test_agent_and_supernode_fine_tune_and_sign(fleet, tmp_path, tmp_path_factory):
    assets = federation_assets(tmp_path_factory.getbasetemp())
    with serve_registry(assets["run_dir"], tmp_path / "registry") as registry:
        fleet.start_superlink()
        config = agent_config(tmp_path / "agent", registry, fleet, assets["pub"])
        agent = fleet.spawn("agent", [str(BIN / "sdr-client"), "agent", "--config", str(config)])
        fleet.start_supernode("supernode-1", digits_node(1, 2, assets["kit_dir"]))
        fleet.wait_for_nodes(2, timeout=180)
        out_dir = tmp_path / "out"
        (tmp_path / "token").write_text(registry.token)
        streamed = fleet.run_app({
            "registry-url": registry.url, "registry-token-file": str(tmp_path / "token"),
            "registry-pubkey": str(registry.pubkey), "signing-key": str(assets["key"]),
            "out-dir": str(out_dir), "num-server-rounds": 2, "local-epochs": 2,
            "round-timeout": 120.0, "node-wait-timeout": 60.0})
        status = fleet.final_status()
        assert status["status"] == "finished:completed", \
            f"{status}\n{streamed}\n{fleet.all_logs()}"
        assert agent.wait(timeout=120) == 0, fleet.log("agent")

    report = json.loads((out_dir / "summary.json").read_text())
    summary, rounds = report["summary"], {r["round"]: r for r in report["rounds"]}
    assert summary["source"]["kind"] == "registry"
    assert summary["images"] == 1797  # both partitions' signatures, weighted by image count
    assert rounds[1]["train_ok"] == 2 and rounds[2]["train_ok"] == 2
    first, final = rounds[1]["eval-accuracy"], rounds[2]["eval-accuracy"]
    assert final > 0.5, report  # chance is 0.1 on ten digits
    assert final >= first, report
    assert rounds[0]["eval-accuracy"] < final  # the routed sub-net with a fresh head
    assert sorted(summary["delivered"].values()) == ["kept", "not kept"]

    pub = load_public_key(assets["pub"])
    bundle = load_bundle(out_dir / "bundle", pub)
    assert bundle.route == tuple(summary["route"]) and bundle.model.num_classes == 10
    assert (out_dir / "report" / "federated_rounds.png").stat().st_size > 1000
    # The agent kept the same signed bundle, ready for export; its log names every step.
    kept = tmp_path / "agent" / "state" / "finetuned"
    load_bundle(kept, pub)
    assert (kept / "manifest.json").read_bytes() == (out_dir / "bundle" / "manifest.json").read_bytes()
    for step in ("kit", "signature", "subnet", "federation"):
        assert f"{step}: done" in fleet.log("agent")
    # The signed model is the aggregated one: it scores what the nodes reported.
    correct = total = 0
    for i in range(2):
        data = load_node_data(NodeDataConfig("builtin:digits", i, 2), 16, 1)
        res = evaluate_local(bundle.model, data.test.images, data.test.labels, bundle.input_spec)
        correct += res.accuracy * res.num_examples
        total += res.num_examples
    assert correct / total == pytest.approx(final, abs=1e-6)
