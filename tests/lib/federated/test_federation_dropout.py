"""A SuperNode SIGKILLed in the middle of a run: the federation finishes with the survivor."""

from __future__ import annotations

import json
import time

import pytest
from helpers_flower import Fleet, digits_node, federation_assets

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def test_sigkill_one_supernode_mid_run(fleet, tmp_path, tmp_path_factory):
    assets = federation_assets(tmp_path_factory.getbasetemp())
    fleet.start_superlink()
    for i in range(2):
        fleet.start_supernode(f"supernode-{i}", digits_node(i, 2, assets["kit_dir"]))
    fleet.wait_for_nodes(2)
    out_dir = tmp_path / "out"
    # Two nodes must answer the signature query; each round then goes on with whoever is left.
    # One local epoch: the 20 s round timeout is about dropouts, not the recipe's 3 epochs.
    proc, lines = fleet.start_app({
        "run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
        "out-dir": str(out_dir), "num-server-rounds": 3, "local-epochs": 1, "min-nodes": 2,
        "min-round-nodes": 1,
        "round-timeout": 20.0, "node-wait-timeout": 60.0, "evaluate-start": False})
    deadline = time.monotonic() + 400
    while not any("[ROUND 2/3]" in line for line in lines):
        assert proc.poll() is None or any("[ROUND 2/3]" in x for x in lines), \
            f"run ended before round 2:\n{''.join(lines)}\n{fleet.all_logs()}"
        assert time.monotonic() < deadline, f"round 2 never started:\n{''.join(lines)}"
        time.sleep(0.2)
    fleet.kill("supernode-1")  # SIGKILL, no goodbye to the SuperLink
    proc.wait(timeout=500)
    status = fleet.final_status()
    assert status["status"] == "finished:completed", f"{status}\n{''.join(lines)}\n{fleet.all_logs()}"

    report = json.loads((out_dir / "summary.json").read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["train_ok"] == 2
    assert rounds[3]["train_ok"] == 1  # only the survivor trained after the kill
    assert rounds[3]["eval-accuracy"] > 0.3
    bundle = load_bundle(out_dir / "bundle", load_public_key(assets["pub"]))
    assert bundle.model.num_classes == 10
