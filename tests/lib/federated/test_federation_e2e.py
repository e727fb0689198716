"""End-to-end on Flower's Deployment Engine: a real SuperLink, real SuperNodes, `flwr run`.

One fleet (SuperLink and SuperNodes) per module serves three runs in order, each with its own
checks; starting it once saves a SuperLink, two SuperNodes and their connection per run.

1. One SuperNode is started by the on-device agent (`sdr-client agent`), which first fetched
   the kit and its sub-net from a real registry; the other is a plain `flower-supernode`. The
   ServerApp takes the routed sub-net from the same registry. The agent stops its SuperNode
   once the bundle arrived; a plain one takes its place for the next runs.
2. The budget-pruned sub-net fine-tuned by the two plain SuperNodes (the in-process details
   are in test_pruned_federation.py).
3. A SuperNode SIGKILLed in the middle of a run: the federation finishes with the survivor.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers_flower import Fleet, digits_node
from helpers_pruned import check_pruned_bundle, run_config
from helpers_registry import serve_registry

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data
from sdr_edge.training.finetune import evaluate_local
from sdr_edge_client.agent import STATE_FILE

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, assets):
    """A SuperLink and the plain SuperNode every run uses (partition 1 of 2)."""
    root = tmp_path_factory.mktemp("deployment")
    f = Fleet(root / "fleet")
    f.start_superlink()
    f.start_supernode("supernode-1", digits_node(1, 2, assets["kit_dir"]))
    yield f
    f.close()
    state = root / "agent" / "state" / STATE_FILE
    if state.is_file():  # the agent's SuperNode runs in its own session
        pid = json.loads(state.read_text())["steps"].get("federation", {}).get("supernode_pid")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def wait_for_exactly(fleet: Fleet, n: int, timeout: float = 120) -> None:
    """Until exactly n SuperNodes are online (a stopped one must have left: a run would
    otherwise sample it and wait out its round timeout)."""
    deadline = time.monotonic() + timeout
    while (online := len(fleet.online_nodes())) != n:
        assert time.monotonic() < deadline, \
            f"{online} SuperNodes online, not {n}, after {timeout} s\n{fleet.all_logs()}"
        time.sleep(1)


def two_plain_supernodes(fleet: Fleet, assets: dict[str, Path]) -> None:
    """supernode-0 (partition 0 of 2) and supernode-1 online, nothing else."""
    for i in range(2):
        name = f"supernode-{i}"
        if name not in fleet.procs or fleet.procs[name].poll() is not None:
            fleet.start_supernode(name, digits_node(i, 2, assets["kit_dir"]))
    wait_for_exactly(fleet, 2)


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


def test_agent_and_supernode_fine_tune_and_sign(fleet, assets, tmp_path):
    agent_dir = fleet.root.parent / "agent"  # the fleet fixture stops what the agent left
    with serve_registry(assets["run_dir"], tmp_path / "registry") as registry:
        wait_for_exactly(fleet, 1)  # supernode-1 alone: the agent's SuperNode is the second
        config = agent_config(agent_dir, registry, fleet, assets["pub"])
        agent = fleet.spawn("agent", [str(BIN / "sdr-client"), "agent", "--config", str(config)])
        fleet.wait_for_nodes(2, timeout=180)
        out_dir = tmp_path / "out"
        (tmp_path / "token").write_text(registry.token)
        streamed = fleet.run_app({
            "registry-url": registry.url, "registry-token-file": str(tmp_path / "token"),
            "registry-pubkey": str(registry.pubkey), "signing-key": str(assets["key"]),
            "out-dir": str(out_dir), "num-server-rounds": 2, "local-epochs": 2,
            "round-timeout": 120.0, "node-wait-timeout": 60.0})
        status = fleet.final_status(streamed=streamed)
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
    kept = agent_dir / "state" / "finetuned"
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


def test_real_supernodes_fine_tune_the_pruned_subnet(fleet, assets, tmp_path):
    """The pruned run of test_pruned_federation.py on real SuperNodes (each with its whole
    partition: more images than the in-process test's limit, so at least as much to learn)."""
    two_plain_supernodes(fleet, assets)
    out = tmp_path / "out"
    streamed = fleet.run_app(run_config(assets, out, **{
        "round-timeout": 120.0, "node-wait-timeout": 60.0}))
    status = fleet.final_status(streamed=streamed)
    assert status["status"] == "finished:completed", f"{status}\n{streamed}\n{fleet.all_logs()}"
    rounds = {r["round"]: r for r in json.loads((out / "summary.json").read_text())["rounds"]}
    assert rounds[1]["train_ok"] == 2
    assert rounds[1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.04, rounds
    check_pruned_bundle(assets, out)


def test_sigkill_one_supernode_mid_run(fleet, assets, tmp_path):
    """Last: it kills supernode-1. The kill comes when supernode-1 receives round 2's train
    message (its ClientApp process has not even imported torch), so round 2 is after the kill
    by construction and two rounds suffice."""
    two_plain_supernodes(fleet, assets)
    out_dir = tmp_path / "out"
    # Two nodes must answer the signature query; each round then goes on with whoever is left.
    # One local epoch: the round timeout is about dropouts, not the recipe's 3 epochs. Round 2
    # lasts the whole timeout (the killed node never answers), but round 1 must fit both nodes'
    # replies in it: 20 s failed round 1 (train_ok 1) in a plain run at load 7, so 40 s.
    proc, lines = fleet.start_app({
        "run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
        "out-dir": str(out_dir), "num-server-rounds": 2, "local-epochs": 1, "min-nodes": 2,
        "min-round-nodes": 1,
        "round-timeout": 40.0, "node-wait-timeout": 60.0, "evaluate-start": False})
    log = fleet.logs / "supernode-1.log"
    trains_before = log.read_text(errors="replace").count("Receiving: train message")
    deadline = time.monotonic() + 400
    while log.read_text(errors="replace").count("Receiving: train message") < trains_before + 2:
        assert proc.poll() is None, f"run ended before round 2:\n{''.join(lines)}\n{fleet.all_logs()}"
        assert time.monotonic() < deadline, f"round 2 never started:\n{''.join(lines)}"
        time.sleep(0.2)
    fleet.kill("supernode-1")  # SIGKILL to its whole session, no goodbye to the SuperLink
    proc.wait(timeout=500)
    status = fleet.final_status(streamed="".join(lines))
    assert status["status"] == "finished:completed", f"{status}\n{''.join(lines)}\n{fleet.all_logs()}"

    report = json.loads((out_dir / "summary.json").read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["train_ok"] == 2
    assert rounds[2]["train_ok"] == 1  # only the survivor trained after the kill
    assert rounds[2]["eval-accuracy"] > 0.3
    bundle = load_bundle(out_dir / "bundle", load_public_key(assets["pub"]))
    assert bundle.model.num_classes == 10
