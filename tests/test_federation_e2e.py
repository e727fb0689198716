"""End-to-end on Flower's Deployment Engine: a real SuperLink, two real SuperNodes, `flwr run`."""

from __future__ import annotations

import json

import pytest
from helpers_flower import Fleet, digits_node, federation_assets

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.local import evaluate_local
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def test_two_supernodes_fine_tune_and_sign(fleet, tmp_path, tmp_path_factory):
    assets = federation_assets(tmp_path_factory.getbasetemp())
    fleet.start_superlink()
    for i in range(2):
        fleet.start_supernode(f"supernode-{i}", digits_node(i, 2, assets["kit_dir"]))
    fleet.wait_for_nodes(2)
    out_dir = tmp_path / "out"
    streamed = fleet.run_app({"run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
                              "out-dir": str(out_dir), "num-server-rounds": 2,
                              "local-epochs": 2, "round-timeout": 120.0,
                              "node-wait-timeout": 60.0})
    status = fleet.final_status()
    assert status["status"] == "finished:completed", f"{status}\n{streamed}\n{fleet.all_logs()}"

    report = json.loads((out_dir / "summary.json").read_text())
    summary, rounds = report["summary"], {r["round"]: r for r in report["rounds"]}
    assert summary["nodes"] and len(summary["nodes"]) == 2
    assert summary["images"] == 1797  # both partitions' signatures, weighted by image count
    assert rounds[1]["train_ok"] == 2 and rounds[2]["train_ok"] == 2
    first, final = rounds[1]["eval-accuracy"], rounds[2]["eval-accuracy"]
    assert final > 0.5, report  # chance is 0.1 on ten digits
    assert final >= first, report
    assert rounds[0]["eval-accuracy"] < final  # the routed sub-net with a fresh head

    bundle = load_bundle(out_dir / "bundle", load_public_key(assets["pub"]))
    assert bundle.route == tuple(summary["route"])
    assert bundle.model.num_classes == 10
    assert (out_dir / "report" / "federated_rounds.png").stat().st_size > 1000
    # The signed model is the aggregated one: it scores what the nodes reported.
    correct = total = 0
    for i in range(2):
        data = load_node_data(NodeDataConfig("builtin:digits", i, 2), 16, 1)
        res = evaluate_local(bundle.model, data.test.images, data.test.labels, bundle.input_spec)
        correct += res.accuracy * res.num_examples
        total += res.num_examples
    assert correct / total == pytest.approx(final, abs=1e-6)
